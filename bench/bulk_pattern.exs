# How the data of a bulk transfer reaches the receiving process over time: 512 MiB over one
# stream between two processes of this VM, three times, in 1 MiB `send/2` pieces.
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/bulk_pattern.exs active|passive
#
# active: the gaps between data messages over 500 µs, their share of the transfer, and how many
# messages were already waiting in the mailbox when one such gap ended (many: the data had
# arrived during the gap and the process had not run; few: nothing had arrived).
# passive: how many `recv(stream, 0)` calls were answered at once from what the stream had read
# ahead, and how many waited for data, how long and for how much.
#
# Settings, all optional (defaults are the library's): READ_AHEAD (bytes, passive),
# STREAM_RECV_WINDOW (the receiving side's, bytes), PIECE (the sender's piece, bytes), and the
# runtime's as bin/bench takes them (BENCH_RUNTIME_SPIN_US, ...).
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

defmodule Bench.BulkPattern do
  @total 512 * 1024 * 1024

  def main([mode]) when mode in ["active", "passive"] do
    Bench.Util.configure_runtime()
    cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_bulk_pattern"))
    for _ <- 1..3, do: IO.puts(run(cert, String.to_atom(mode)))
  end

  def main(_) do
    IO.puts(:stderr, "usage: bulk_pattern.exs active|passive")
    System.halt(2)
  end

  defp env_int(name), do: System.get_env(name) && String.to_integer(System.get_env(name))

  defp run(cert, mode) do
    window = env_int("STREAM_RECV_WINDOW")
    {l, c, sc} = Bench.Macula.pair(cert, if(window, do: [stream_recv_window: window], else: []))
    read_ahead = env_int("READ_AHEAD")
    opts = [active: mode == :active] ++ if(read_ahead, do: [read_ahead: read_ahead], else: [])
    :ok = MaculaQuic.async_accept_stream(sc, opts)
    sender = start_sender(c, env_int("PIECE") || 1024 * 1024)
    ss = receive(do: ({:quic, :new_stream, ss, _} -> ss))
    t0 = now()
    {n, stats} = if mode == :active, do: active(ss, t0), else: passive(ss)
    us = now() - t0
    if n != @total, do: raise("received #{n} of #{@total} bytes")
    send(sender, :stop)
    # (Also empties the mailbox, whose length the next transfer's report counts.)
    Bench.Macula.teardown(l, c, sc)
    "#{Bench.Util.fmt(Bench.Util.mib_s(n, us))} MiB/s; " <> report(mode, stats, us)
  end

  defp start_sender(c, piece_size) do
    piece = :binary.copy(<<7>>, piece_size)

    spawn_link(fn ->
      {:ok, s} = MaculaQuic.open_stream(c)
      for _ <- 1..div(@total, piece_size), do: :ok = MaculaQuic.send(s, piece)
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_graceful(), 0)
      receive(do: (:stop -> :ok))
    end)
  end

  # Active: every gap over 500 µs, with the mailbox's length when it ended.
  defp active(ss, t0), do: active(ss, 0, t0, 0, [])

  defp active(ss, n, last, msgs, gaps) do
    receive do
      {:quic, d, ^ss, _} when is_binary(d) ->
        t = now()

        gaps =
          if t - last > 500 do
            {:message_queue_len, q} = Process.info(self(), :message_queue_len)
            [{t - last, q} | gaps]
          else
            gaps
          end

        active(ss, n + byte_size(d), t, msgs + 1, gaps)

      {:quic, :peer_send_shutdown, ^ss, _} ->
        {n, %{messages: msgs, gaps: gaps}}
    end
  end

  # Passive: `recv(stream, 0)` through the NIF, to tell an answer at once from a wait.
  defp passive(ss), do: passive(ss, 0, [], [])

  defp passive(ss, n, now_sizes, waits) do
    ref = make_ref()
    t = now()

    case MaculaQuic.Native.stream_recv(ss, 0, ref) do
      {:ok, d} ->
        passive(ss, n + byte_size(d), [byte_size(d) | now_sizes], waits)

      # :building: an answer over 1 MiB, copied on a runtime thread (`read_ahead` above 1 MiB).
      wait when wait in [:wait, :building] ->
        receive do
          {^ref, {:ok, d}} ->
            passive(ss, n + byte_size(d), now_sizes, [{now() - t, byte_size(d)} | waits])

          {^ref, {:error, _}} ->
            {n, %{now: now_sizes, waits: waits}}
        end

      {:error, _} ->
        {n, %{now: now_sizes, waits: waits}}
    end
  end

  defp report(:active, %{messages: m, gaps: gaps}, us) do
    gap_us = gaps |> Enum.map(&elem(&1, 0)) |> Enum.sum()

    queued =
      Enum.frequencies_by(gaps, fn {_, q} ->
        cond do
          q == 0 -> "0"
          q < 5 -> "1-4"
          q < 20 -> "5-19"
          true -> "20+"
        end
      end)

    "#{m} messages; #{length(gaps)} gaps over 500 us, #{div(gap_us, 1000)} ms of #{div(us, 1000)} ms " <>
      "(#{div(gap_us, max(length(gaps), 1))} us each); messages waiting when a gap ended: " <>
      Enum.map_join(["0", "1-4", "5-19", "20+"], ", ", &"#{&1}: #{Map.get(queued, &1, 0)}")
  end

  defp report(:passive, %{now: now_sizes, waits: waits}, us) do
    wait_us = waits |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    avg = fn xs -> div(Enum.sum(xs), max(length(xs), 1)) end

    "recv answered at once #{length(now_sizes)} times (#{avg.(now_sizes)} bytes each), " <>
      "waited #{length(waits)} times (#{avg.(Enum.map(waits, &elem(&1, 1)))} bytes, " <>
      "#{div(wait_us, max(length(waits), 1))} us each; #{div(wait_us, 1000)} ms of #{div(us, 1000)} ms)"
  end

  defp now, do: System.monotonic_time(:microsecond)
end

Bench.BulkPattern.main(System.argv())
