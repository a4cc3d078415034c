# Workload 5, run in a fresh VM by bench/run.exs (so earlier workloads leave no garbage behind):
# open CONNS idle macula_quic connections (both ends in this VM), and print one JSON line with the
# resident memory (VM + native, /proc/self/status VmRSS) per connection.
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/memory.exs CERTFILE KEYFILE CONNS
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

[certfile, keyfile, conns] = System.argv()
n = String.to_integer(conns)
cert = %{certfile: certfile, keyfile: keyfile}
conc = 16
# Idle connections must outlive the measurement; the Quinn baseline gets the same setting.
opts = [idle_timeout_ms: 120_000]

# A burst of connects can run more than the default backlog (1024) of handshakes ahead of the
# acceptor; the test measures memory, not the backlog, so it is raised.
{l, port} = Bench.Macula.listen(cert, opts ++ [backlog: 1_000_000])
me = self()

acceptor =
  spawn_link(fn ->
    hold = fn hold, acc ->
      receive do
        {:quic, :new_conn, c, _} ->
          :ok = MaculaQuic.async_accept(l)
          hold.(hold, [c | acc])

        {:count, from} ->
          send(from, {:held, length(acc)})
          hold.(hold, acc)

        _ ->
          hold.(hold, acc)
      end
    end

    :ok = MaculaQuic.async_accept(l)
    hold.(hold, [])
  end)

# Warm-up: one connection, so the runtime, endpoints and TLS state exist before measuring.
:ok = MaculaQuic.close_connection(Bench.Macula.connect(port, opts))
send(acceptor, {:count, me})
receive(do: ({:held, _} -> :ok))
Process.sleep(300)
for p <- Process.list(), do: :erlang.garbage_collect(p)
rss0 = Bench.Util.rss_bytes()
beam0 = :erlang.memory(:total)
t0 = System.monotonic_time(:millisecond)

holders =
  for i <- 0..(conc - 1) do
    mine = div(n, conc) + if(i < rem(n, conc), do: 1, else: 0)

    spawn_link(fn ->
      cs = for _ <- 1..mine//1, do: Bench.Macula.connect(port, opts)
      send(me, {:opened, self(), length(cs)})
      receive(do: (:stop -> cs))
    end)
  end

opened = Enum.reduce(holders, 0, fn h, acc -> receive(do: ({:opened, ^h, k} -> acc + k)) end)

held =
  Enum.reduce_while(1..200, 0, fn _, _ ->
    send(acceptor, {:count, me})
    k = receive(do: ({:held, k} -> k))

    if k >= n + 1,
      do: {:halt, k},
      else:
        (
          Process.sleep(50)
          {:cont, k}
        )
  end)

open_s = (System.monotonic_time(:millisecond) - t0) / 1000
Process.sleep(1_000)
for p <- Process.list(), do: :erlang.garbage_collect(p)
rss1 = Bench.Util.rss_bytes()
beam1 = :erlang.memory(:total)

IO.puts(
  Bench.Util.json(%{
    workload: "memory",
    conns: n,
    opened: opened,
    accepted: held - 1,
    open_seconds: open_s,
    rss_before: rss0,
    rss_after: rss1,
    bytes_per_conn: (rss1 - rss0) / n,
    beam_bytes_per_conn: (beam1 - beam0) / n
  })
  |> String.replace(~r/\s+/, "")
)
