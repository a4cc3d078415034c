# What `inline_watch_us` costs a process that only sends: 64-byte `send/2`s on one stream to a
# second VM that reads them and answers nothing (so the only datagrams that come back are
# acknowledgements), then FIN; prints the messages per second (until the receiver has counted
# them all) and this VM's watch counts. bench/README.md's section "`inline_watch_us` with the
# peer in another OS process" cites it.
#
#   BENCH_INLINE_WATCH_US=50 elixir -pa EBIN bench/one_way.exs [MESSAGES]
#
# MESSAGES defaults to 100,000. EBIN: bin/bench's build (or `MIX_ENV=bench MACULA_QUIC_BUILD=1
# mix compile`, then _build/bench/lib/macula_quic/ebin). The receiving VM runs this script with
# `sink CERTFILE KEYFILE` and inherits the runtime settings (BENCH_*).
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Bench.Util.configure_runtime()

defmodule Bench.OneWay do
  def main(["sink", certfile, keyfile]),
    do: Bench.Macula.serve_until_eof(%{certfile: certfile, keyfile: keyfile}, &sink/1)

  def main(args) do
    n =
      case args do
        [] -> 100_000
        [s] -> String.to_integer(s)
      end

    cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_one_way_cert"))
    sink = Bench.Util.elixir_vm(Path.expand(__ENV__.file), ["sink", cert.certfile, cert.keyfile])

    Bench.Util.with_server(sink, fn port, _os_pid ->
      c = Bench.Macula.connect(port)
      {:ok, s} = MaculaQuic.open_stream(c, active: true)
      msg = :binary.copy("x", 64)
      c0 = MaculaQuic.native_counts()
      t0 = System.monotonic_time(:microsecond)
      for _ <- 1..n, do: :ok = MaculaQuic.send(s, msg)
      # 4: FIN (quicer's send flag).
      :ok = MaculaQuic.send(s, "", 4)

      # The receiver answers with its byte count once it has seen the FIN.
      expected = "#{n * 64}"

      receive do
        {:quic, ^expected, ^s, _} -> :ok
      after
        60_000 -> raise "the receiving VM did not count #{expected} bytes within 60 s"
      end

      us = System.monotonic_time(:microsecond) - t0
      c1 = MaculaQuic.native_counts()
      :ok = MaculaQuic.close_connection(c)
      # (Map.get: builds before inline_watch_unanswered have no such count.)
      d = fn key -> Map.get(c1, key, 0) - Map.get(c0, key, 0) end

      IO.puts(
        "inline_watch_us=#{c1.inline_watch_us} messages=#{n} messages_per_s=#{round(n / us * 1.0e6)} " <>
          "watches=#{d.(:inline_watches)} skips=#{d.(:inline_watch_skips)} " <>
          "unanswered=#{d.(:inline_watch_unanswered)}"
      )
    end)
  end

  # Counts what arrives on each stream of each connection; answers a stream's FIN with the count.
  defp sink(l) do
    :ok = MaculaQuic.async_accept(l)
    sink_loop(l, %{})
  end

  defp sink_loop(l, counts) do
    receive do
      {:quic, :new_conn, c, _} ->
        :ok = MaculaQuic.async_accept_stream(c, active: true)
        :ok = MaculaQuic.async_accept(l)
        sink_loop(l, counts)

      {:quic, data, s, flags} when is_binary(data) ->
        counts = Map.update(counts, s, byte_size(data), &(&1 + byte_size(data)))
        if Bitwise.band(flags, 2) != 0, do: answer(s, counts)
        sink_loop(l, counts)

      {:quic, :peer_send_shutdown, s, _} ->
        answer(s, counts)
        sink_loop(l, counts)

      _ ->
        sink_loop(l, counts)
    end
  end

  defp answer(s, counts),
    do: MaculaQuic.send(s, "#{Map.get(counts, s, 0)}", 4)
end

Bench.OneWay.main(System.argv())
