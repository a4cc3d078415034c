# How long a connection query holds the calling scheduler while a transfer keeps Quinn's driver
# busy: 1 GiB moves over one stream while a process times the native part of `getstat`
# (from 2026-11-25: the hand-over to the runtime, MaculaQuic.Native.conn_query/3; before that:
# the whole getstat NIF, which read Quinn's state itself) and of `async_accept_stream` on the
# receiving connection (MaculaQuic.Native.conn_accept_stream/3, withdrawn at once; until
# 2026-11-27 it asked Quinn whether the connection had ended even when the driver was at work
# on another thread, waiting for its lock), and a whole 64-byte `send/2` on a second stream of
# the sending connection (which runs that connection's work, and its peer's, in the call: see
# bench/README.md, "A driver kept off the schedulers after long steps"), next to a NIF that
# takes no lock (MaculaQuic.Native.ping/0) as the control for the OS's own preemption.
#
#   MIX_ENV=bench MACULA_QUIC_BUILD=1 mix compile
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/query_stalls.exs
Code.require_file("lib/util.ex", __DIR__)

defmodule Bench.QueryStalls do
  @small :binary.copy(<<7>>, 64)

  def main do
    cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_stalls"))
    tls = [alpn: ["stalls"], certfile: cert.certfile, keyfile: cert.keyfile]
    {:ok, l} = MaculaQuic.listen({"127.0.0.1", 0}, tls)
    {:ok, {_, port}} = MaculaQuic.sockname(l)
    :ok = MaculaQuic.async_accept(l)
    {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: ["stalls"], verify: :none], 5_000)
    sc = receive(do: ({:quic, :new_conn, sc, _} -> sc))
    :ok = MaculaQuic.async_accept_stream(sc, active: true)
    piece = :binary.copy(<<7>>, 1_048_576)

    spawn_link(fn ->
      {:ok, s} = MaculaQuic.open_stream(c)
      for _ <- 1..1024, do: :ok = MaculaQuic.send(s, piece)
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_graceful(), 0)
      receive(do: (:stop -> :ok))
    end)

    me = self()
    # Started once the stream is accepted, so that its accepts cannot take the stream.
    ss = receive(do: ({:quic, :new_stream, ss, _} -> ss))
    # A second stream of the sending connection, for small sends: its server end is drained
    # by a process of its own, accepted before the prober's accepts begin.
    drainer = spawn_link(fn -> drain_other(sc, me) end)
    receive(do: (:accepting -> :ok))
    {:ok, small} = MaculaQuic.open_stream(c)
    :ok = MaculaQuic.send(small, "first")
    receive(do: ({:drained, "first"} -> :ok))
    prober = spawn_link(fn -> probe(c, sc, small, me, {[], [], [], []}) end)
    drain(ss)
    send(prober, :stop)

    receive do
      {:probed, {query, accept, sends, ping}} ->
        IO.puts("getstat, native part: " <> summary(query))
        IO.puts("async_accept_stream, native part: " <> summary(accept))
        IO.puts("64-byte send/2 on the sending connection: " <> summary(sends))
        IO.puts("ping (takes no lock): " <> summary(ping))
    end

    send(drainer, :stop)
  end

  defp probe(c, sc, small, parent, {query, accept, sends, ping} = acc) do
    receive do
      :stop ->
        sorted = acc |> Tuple.to_list() |> Enum.map(&Enum.sort/1) |> List.to_tuple()
        send(parent, {:probed, sorted})
    after
      0 ->
        acc =
          {[time_query(c) | query], [time_accept(sc) | accept],
           [time_us(fn -> :ok = MaculaQuic.send(small, @small) end) | sends],
           [time_us(&MaculaQuic.Native.ping/0) | ping]}

        probe(c, sc, small, parent, acc)
    end
  end

  defp drain_other(sc, parent) do
    :ok = MaculaQuic.async_accept_stream(sc, active: true)
    send(parent, :accepting)
    s = receive(do: ({:quic, :new_stream, s, _} -> s))
    receive(do: ({:quic, "first", ^s, _} -> send(parent, {:drained, "first"})))
    discard(s)
  end

  defp discard(s) do
    receive do
      {:quic, d, ^s, _} when is_binary(d) -> discard(s)
      :stop -> :ok
    end
  end

  defp time_accept(sc) do
    ref = make_ref()
    {d, {:ok, id}} = :timer.tc(fn -> MaculaQuic.Native.conn_accept_stream(sc, %{}, ref) end)
    :cancelled = MaculaQuic.Native.conn_cancel_accept(sc, id)
    d
  end

  defp time_query(c) do
    if function_exported?(MaculaQuic.Native, :conn_query, 3) do
      ref = make_ref()
      d = time_us(fn -> :ok = MaculaQuic.Native.conn_query(c, :stats, ref) end)
      receive(do: ({^ref, _} -> d))
    else
      time_us(fn -> {:ok, _} = MaculaQuic.getstat(c, [:send_cnt]) end)
    end
  end

  defp time_us(fun) do
    t = System.monotonic_time(:microsecond)
    fun.()
    System.monotonic_time(:microsecond) - t
  end

  defp drain(ss) do
    receive do
      {:quic, d, ^ss, flags} when is_binary(d) -> if Bitwise.band(flags, 2) == 0, do: drain(ss)
      {:quic, :peer_send_shutdown, ^ss, _} -> :ok
    end
  end

  defp summary(sorted) do
    n = length(sorted)
    at = fn p -> Enum.at(sorted, min(n - 1, div(n * p, 1000))) end

    "#{n} calls, µs: p50 #{at.(500)}, p99 #{at.(990)}, p99.9 #{at.(999)}, max #{List.last(sorted)}; " <>
      "over 1 ms: #{Enum.count(sorted, &(&1 > 1_000))}, over 5 ms: #{Enum.count(sorted, &(&1 > 5_000))}"
  end
end

Bench.QueryStalls.main()
