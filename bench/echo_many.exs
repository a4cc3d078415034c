# 64-byte echo with the peer in a second VM, from several processes at once, each with its own
# connection: what `inline_watch_us` does when more than one request/response chain shares the
# schedulers. Prints the round trips per second of all the processes together, this VM's watch
# counts, and the connections' smallest round trips as Quinn measured them (`min_rtt_us`).
# bench/README.md's section "`inline_watch_us`: only where an answer can come in time" cites it.
#
#   BENCH_INLINE_WATCH_US=50 elixir -pa EBIN bench/echo_many.exs [PROCESSES [SECONDS]]
#
# With BUSY=N, N more processes of this VM spin on plain Erlang work (counting) for the same
# time, and the script prints their work per second too: what the echo costs the node's other
# processes, such as the scheduler time a watch holds while it waits.
#
# PROCESSES defaults to 16, SECONDS to 3. EBIN: bin/bench's build (or `bench/build.sh DIR`, then
# DIR/macula_quic/ebin). The echoing VM runs this script with `serve CERTFILE KEYFILE` (one
# process per connection, unlike bench/echo_server.exs, which serves one connection at a time)
# and inherits the runtime settings (BENCH_*).
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Bench.Util.configure_runtime()

defmodule Bench.EchoMany do
  @msg :binary.copy(<<1>>, 64)

  def main(["serve", certfile, keyfile]),
    do: Bench.Macula.serve_until_eof(%{certfile: certfile, keyfile: keyfile}, &accept/1)

  def main(args) do
    [procs, seconds] =
      case Enum.map(args, &String.to_integer/1) do
        [] -> [16, 3]
        [p] -> [p, 3]
        [p, s] -> [p, s]
      end

    cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_echo_many_cert"))

    server =
      Bench.Util.elixir_vm(Path.expand(__ENV__.file), ["serve", cert.certfile, cert.keyfile])

    Bench.Util.with_server(server, fn port, _os_pid -> measure(port, procs, seconds) end)
  end

  defp measure(port, procs, seconds) do
    me = self()
    clients = for _ <- 1..procs, do: spawn_link(fn -> client(me, port) end)
    for c <- clients, do: receive(do: ({:ready, ^c} -> :ok))
    busy = for _ <- 1..String.to_integer(System.get_env("BUSY", "0")), do: spawn_link(&busy/0)
    c0 = MaculaQuic.native_counts()
    deadline = System.monotonic_time(:microsecond) + seconds * 1_000_000
    for c <- clients ++ busy, do: send(c, {:go, me, deadline})
    results = for c <- clients, do: receive(do: ({:done, ^c, n, rtt} -> {n, rtt}))
    work = Enum.sum(for b <- busy, do: receive(do: ({:busy, ^b, n} -> n)))
    c1 = MaculaQuic.native_counts()
    for c <- clients, do: send(c, :close)
    {counts, rtts} = Enum.unzip(results)
    d = fn key -> Map.get(c1, key, 0) - Map.get(c0, key, 0) end

    IO.puts(
      "processes=#{procs} inline_watch_us=#{c1.inline_watch_us} " <>
        "round_trips_per_s=#{round(Enum.sum(counts) / seconds)} " <>
        "watches=#{d.(:inline_watches)} skips=#{d.(:inline_watch_skips)} " <>
        "far=#{d.(:inline_watch_far)} inline_receives=#{d.(:inline_receives)} " <>
        "min_rtt_us=#{Enum.min(rtts)}-#{Enum.max(rtts)}" <>
        if(busy == [],
          do: "",
          else: " busy=#{length(busy)} busy_work_per_s=#{round(work / seconds)}"
        )
    )
  end

  # Counts in steps of 1,000 until the deadline: plain Erlang work, as a node's other processes do.
  defp busy do
    {parent, deadline} = receive(do: ({:go, p, d} -> {p, d}))
    send(parent, {:busy, self(), count_until(deadline, 0)})
  end

  defp count_until(deadline, n) do
    if System.monotonic_time(:microsecond) < deadline,
      do: count_until(deadline, n + count(1000)),
      else: n
  end

  defp count(0), do: 0
  defp count(k), do: 1 + count(k - 1)

  # One request/response chain: warms up, waits for the start, echoes until the deadline.
  defp client(parent, port) do
    c = Bench.Macula.connect(port)
    {:ok, s} = MaculaQuic.open_stream(c, active: true)
    for _ <- 1..200, do: round_trip(s)
    send(parent, {:ready, self()})
    deadline = receive(do: ({:go, _, d} -> d))
    n = echo_until(s, deadline, 0)
    {:ok, [min_rtt_us: rtt]} = MaculaQuic.getstat(c, [:min_rtt_us])
    send(parent, {:done, self(), n, rtt})
    receive(do: (:close -> MaculaQuic.close_connection(c)))
  end

  defp echo_until(s, deadline, n) do
    if System.monotonic_time(:microsecond) < deadline do
      round_trip(s)
      echo_until(s, deadline, n + 1)
    else
      n
    end
  end

  defp round_trip(s) do
    :ok = MaculaQuic.async_send(s, @msg)
    receive(do: ({:quic, _, ^s, _} -> :ok))
  end

  defp accept(l) do
    :ok = MaculaQuic.async_accept(l)

    receive do
      {:quic, :new_conn, c, _} ->
        pid = spawn(fn -> serve(c) end)
        :ok = MaculaQuic.controlling_process(c, pid)
        send(pid, :go)
        accept(l)
    end
  end

  defp serve(c) do
    receive(do: (:go -> :ok))
    :ok = MaculaQuic.async_accept_stream(c, active: true)
    relay()
  end

  defp relay do
    receive do
      {:quic, d, s, _} when is_binary(d) ->
        :ok = MaculaQuic.async_send(s, d)
        relay()

      {:quic, :closed, _, _} ->
        :ok

      _ ->
        relay()
    end
  end
end

Bench.EchoMany.main(System.argv())
