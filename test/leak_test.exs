defmodule MaculaQuic.LeakTest do
  # Not async: it reads the library's global live-object counters, so nothing else may run.
  use ExUnit.Case, async: false
  import MaculaQuic.Test.Quic

  @moduletag :leak
  @connections 5_000
  @batch 50
  @idle_ms 5_000

  @tag timeout: 600_000
  test "5,000 connections with streams, owners killed mid-transfer: nothing native is left, memory returns" do
    # Whatever earlier tests left must be gone before we measure.
    %{owners: owners_base} = await_counts!(%{listeners: 0, connections: 0, streams: 0}, 30_000)
    # Under this load a CONNECTION_CLOSE can be lost (a full socket buffer); the connection then
    # ends by idle timeout. A short one keeps such stragglers within the waits below.
    {l, port} = listen!("127.0.0.1", idle_timeout_ms: @idle_ms)
    server = spawn_link(fn -> acceptor(l) end)
    :ok = MaculaQuic.controlling_process(l, server)

    # Warm up (runtime threads, client endpoint, allocator pools), then take the baseline.
    run_batch(port, 0..(@batch - 1))
    await_counts!(%{connections: 0, streams: 0}, 30_000)
    base = memory()

    rounds = String.to_integer(System.get_env("LEAK_ROUNDS", "1"))

    for round <- 1..rounds do
      for first <- 0..(@connections - 1)//@batch do
        run_batch(port, first..(first + @batch - 1))
      end

      if rounds > 1 do
        await_counts!(%{connections: 0, streams: 0}, 60_000)
        m = memory()
        IO.puts("\n  round #{round}: VM #{mib(m.vm)} MiB, RSS #{mib(m.rss)} MiB")
      end
    end

    counts = await_counts!(%{connections: 0, streams: 0}, 60_000)
    Process.unlink(server)
    Process.exit(server, :kill)

    # Client endpoints (and their shards) are shared and stay; the listener's shard goes.
    endpoints = MaculaQuic.native_counts().client_endpoints

    counts =
      Map.merge(
        counts,
        await_counts!(
          %{
            listeners: 0,
            connections: 0,
            streams: 0,
            tasks: 0,
            bound_addresses: 0,
            shards: endpoints,
            shard_runners: endpoints,
            # Every client, handler and the acceptor has exited; this test process owned the
            # listener once and is still alive.
            owners: owners_base + 1
          },
          30_000
        )
      )

    after_run = memory()

    IO.puts(
      "\n  #{@connections} connections: VM #{mib(base.vm)} -> #{mib(after_run.vm)} MiB, " <>
        "RSS #{mib(base.rss)} -> #{mib(after_run.rss)} MiB, counts #{inspect(counts)}"
    )

    assert counts.connections == 0 and counts.streams == 0 and counts.listeners == 0
    assert counts.shards == counts.client_endpoints
    assert counts.shard_runners <= counts.shards
    assert counts.tasks == 0 and counts.bound_addresses == 0
    assert counts.owners <= owners_base + 1
    # Memory returns to its starting level, within allocator slack.
    assert after_run.vm - base.vm < 32 * 1_048_576
    assert after_run.rss - base.rss < 96 * 1_048_576
  end

  # received.rs: payloads of 16 KiB up to one 64 KiB chunk are copied into the library's own
  # buffers (64 KiB ones from a pool), which the binaries point into; smaller and larger ones
  # are ordinary BEAM binaries.
  test "large received binaries: byte-exact, untouched while their buffers' pool is reused, freed with the last reference" do
    await_counts!(%{received_buffers: 0}, 30_000)
    {c, sc, l, _port} = pair!()
    {s, ss} = stream_pair!(c, sc, server: [active: false], first: "x")
    {:ok, "x"} = MaculaQuic.recv(ss, 1, 5_000)
    me = self()
    # 64 KiB (pooled), 20,000 B (a buffer of its own), 100 B and 200,000 B (BEAM binaries).
    lens = [65_536, 20_000, 100, 200_000]
    round = Enum.sum(lens)
    data = :crypto.strong_rand_bytes(4 * round)
    sender = spawn_link(fn -> send(me, {:sent, MaculaQuic.send(s, data)}) end)
    receiver = spawn_link(fn -> receiver_loop(ss, []) end)
    :ok = MaculaQuic.controlling_process(ss, receiver)

    # Round 1: the receiver holds all it got; two buffers are alive, one per round's 64 KiB and
    # 20,000-byte payloads.
    send(receiver, {:recv, me, lens, :keep})
    assert_receive {:got, got}, 10_000
    assert got == binary_part(data, 0, round)
    assert MaculaQuic.native_counts().received_buffers == 2

    # The receiver keeps only a 1000-byte part of the 64 KiB payload (the whole buffer stays
    # alive for it) and drops the rest; three more rounds go through the pool meanwhile.
    send(receiver, {:keep_part, me, 100, 1000})
    assert_receive :kept, 5_000
    await_counts!(%{received_buffers: 1})

    for n <- 1..3 do
      send(receiver, {:recv, me, lens, :drop})
      assert_receive {:got, got}, 10_000
      assert got == binary_part(data, n * round, round)
    end

    assert_receive {:sent, :ok}, 10_000
    send(receiver, {:kept, me})
    assert_receive {:kept, part}, 5_000
    assert part == binary_part(data, 100, 1000)

    # The last reference goes with the receiver: so does the buffer.
    unlink_and_stop(receiver)
    unlink_and_stop(sender)
    await_counts!(%{received_buffers: 0})

    # Small payloads never take a buffer.
    {:ok, s2} = MaculaQuic.open_stream(c)
    :ok = MaculaQuic.async_accept_stream(sc, active: true)
    :ok = MaculaQuic.send(s2, "small")
    assert_receive {:quic, :new_stream, ss2, _}, 5_000
    assert_receive {:quic, "small", ^ss2, _}, 5_000
    assert MaculaQuic.native_counts().received_buffers == 0

    :ok = MaculaQuic.close_connection(c)
    :ok = MaculaQuic.close_listener(l)
    MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero())
  end

  defp receiver_loop(ss, kept) do
    receive do
      {:recv, from, lens, keep} ->
        bins = for len <- lens, do: elem({:ok, _} = MaculaQuic.recv(ss, len, 10_000), 1)
        send(from, {:got, :binary.copy(IO.iodata_to_binary(bins))})
        receiver_loop(ss, if(keep == :keep, do: bins, else: kept))

      {:keep_part, from, at, len} ->
        part = binary_part(hd(kept), at, len)
        send(from, :kept)
        receiver_loop(ss, [part])

      {:kept, from} ->
        send(from, {:kept, :binary.copy(hd(kept))})
        receiver_loop(ss, kept)
    end
  end

  defp unlink_and_stop(pid) do
    ref = Process.monitor(pid)
    Process.unlink(pid)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, _, _, _}, 5_000
  end

  # One batch of clients, concurrently. A third close properly, a third are killed while
  # sending, a third exit without closing anything.
  defp run_batch(port, range) do
    parent = self()

    pids =
      for i <- range do
        spawn(fn -> client(parent, port, rem(i, 3)) end)
      end

    Enum.each(pids, fn pid ->
      receive do
        {:sending, ^pid} -> Process.exit(pid, :kill)
        {:done, ^pid} -> :ok
      after
        30_000 -> flunk("client #{inspect(pid)} hung")
      end
    end)
  end

  defp client(parent, port, kind) do
    {:ok, c} =
      MaculaQuic.connect("127.0.0.1", port, [alpn: alpn(), idle_timeout_ms: @idle_ms], 10_000)

    {:ok, s} = MaculaQuic.open_stream(c)
    :ok = MaculaQuic.send(s, :binary.copy("x", 16_384))

    case kind do
      0 ->
        :ok = MaculaQuic.close_stream(s)
        :ok = MaculaQuic.close_connection(c)
        send(parent, {:done, self()})

      1 ->
        send(parent, {:sending, self()})
        send_forever(s)

      2 ->
        send(parent, {:done, self()})
    end
  end

  defp send_forever(s) do
    _ = MaculaQuic.send(s, :binary.copy("y", 65_536))
    send_forever(s)
  end

  # Accepts every connection and gives it to a handler that drains its streams and exits when
  # the connection ends.
  defp acceptor(l) do
    case MaculaQuic.accept(l, [], :infinity) do
      {:ok, c} ->
        handler = spawn(fn -> handler(c) end)
        :ok = MaculaQuic.controlling_process(c, handler)
        send(handler, :go)
        # A connection that ends before it is handed over reports to us; a message not read
        # keeps its handle alive, so read them.
        flush()
        acceptor(l)
    end
  end

  defp flush do
    receive do
      {:quic, _, _, _} -> flush()
    after
      0 -> :ok
    end
  end

  defp handler(c) do
    receive do: (:go -> :ok)

    # A client that exits at once may have closed the connection already.
    case MaculaQuic.async_accept_stream(c) do
      :ok -> handle(c)
      {:error, _} -> :ok
    end
  end

  defp handle(c) do
    receive do
      {:quic, :closed, ^c, _} -> :ok
      {:quic, :new_stream, _s, _} -> handle(c)
      {:quic, _, _, _} -> handle(c)
    after
      30_000 -> :ok
    end
  end

  defp memory do
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)

    [rss_kb] =
      Regex.run(~r/VmRSS:\s+(\d+)/, File.read!("/proc/self/status"), capture: :all_but_first)

    %{vm: :erlang.memory(:total), rss: String.to_integer(rss_kb) * 1024}
  end

  defp mib(bytes), do: div(bytes, 1_048_576)
end
