# The CPU a VM spends while two of its processes exchange 64-byte messages over one stream at a
# paced RATE round trips/s for SECS seconds (sparse request/response, where the runtime goes idle
# between round trips): utime + stime of the VM from /proc/self/stat (10 ms ticks). The runtime
# settings come from the environment as in bin/bench (BENCH_RUNTIME_SPIN_US, ...).
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/sparse_cpu.exs 200 10
Code.require_file("lib/util.ex", __DIR__)
[rate, secs] = Enum.map(System.argv(), &String.to_integer/1)
Bench.Util.configure_runtime()
{:ok, l} = MaculaQuic.listen("127.0.0.1", 0, alpn: ["t"])
{:ok, {_, port}} = MaculaQuic.sockname(l)
:ok = MaculaQuic.async_accept(l)
{:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: ["t"], verify: :none], 5_000)

sc =
  receive do
    {:quic, :new_conn, sc, _} -> sc
  end

echo =
  spawn_link(fn ->
    :ok = MaculaQuic.async_accept_stream(sc, active: true)

    loop = fn loop ->
      receive do
        {:quic, d, ss, _} when is_binary(d) ->
          :ok = MaculaQuic.async_send(ss, d)
          loop.(loop)

        _ ->
          loop.(loop)
      end
    end

    loop.(loop)
  end)

:ok = MaculaQuic.controlling_process(sc, echo)
{:ok, s} = MaculaQuic.open_stream(c, active: true)
msg = :binary.copy("x", 64)

ping = fn ->
  :ok = MaculaQuic.async_send(s, msg)

  receive do
    {:quic, ^msg, ^s, _} -> :ok
  end
end

for _ <- 1..50, do: ping.()

ticks = fn ->
  [_, rest] = String.split(File.read!("/proc/self/stat"), ") ", parts: 2)
  f = String.split(rest, " ")
  String.to_integer(Enum.at(f, 11)) + String.to_integer(Enum.at(f, 12))
end

t0 = ticks.()
w0 = System.monotonic_time(:microsecond)
n = rate * secs

for i <- 1..n do
  ping.()
  # Paced: the i-th round trip starts at i/rate seconds.
  wait = div(w0 + div(i * 1_000_000, rate) - System.monotonic_time(:microsecond), 1000)
  if wait > 0, do: Process.sleep(wait)
end

t1 = ticks.()
w1 = System.monotonic_time(:microsecond)
IO.puts("RESULT cpu_ms=#{(t1 - t0) * 10} wall_ms=#{div(w1 - w0, 1000)} round_trips=#{n}")
