defmodule MaculaQuic.ShardTest do
  # Not async: it reads the library's global counters, so nothing else may run meanwhile.
  use ExUnit.Case, async: false
  import MaculaQuic.Test.Quic

  @moduletag :shards

  # Whatever a test leaves open is its owner's, the test process: once that has exited, nothing
  # may be left on the native side.
  setup do
    on_exit(fn -> MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero(), 30_000) end)
  end

  test "a send does the endpoint's work on the sender's own thread when the endpoint is idle" do
    {c, sc, _l, _} = pair!()
    {s, ss} = stream_pair!(c, sc, first: "a")
    assert_receive {:quic, "a", ^ss, _}, 5_000
    before = MaculaQuic.native_counts()
    rounds = 200

    for i <- 1..rounds do
      msg = Integer.to_string(i)
      :ok = MaculaQuic.send(s, msg)
      assert_receive {:quic, ^msg, ^ss, _}, 5_000
      :ok = MaculaQuic.send(ss, msg)
      assert_receive {:quic, ^msg, ^s, _}, 5_000
    end

    after_ = MaculaQuic.native_counts()
    inline = after_.inline_runs - before.inline_runs
    runtime = after_.runtime_runs - before.runtime_runs
    IO.puts("\n  #{2 * rounds} sends: #{inline} inline runs, #{runtime} runtime runs")
    # Each send wakes its stream's writer. When nothing else runs the endpoint at that moment,
    # the send runs the writer and Quinn's driver itself, and (the peer being in this VM)
    # receives the datagram it sent and runs the peer's side too: about three inline runs per
    # send (1114-1208 for the 400 sends alone, at the defaults). A worker watching the sockets
    # (runtime_spin_us) sometimes has the endpoint when a send comes, and then keeps its work.
    # At least one inline run per send on average, then.
    assert inline >= 2 * rounds
  end

  test "a recv answer over 1 MiB is built on a runtime worker, never in the call; it comes whatever the timeout" do
    mib = 1_048_576
    {c, sc, _l, _} = pair!()
    {s, ss} = stream_pair!(c, sc, server: [active: false, read_ahead: 4 * mib], first: "a")
    payload = :crypto.strong_rand_bytes(3 * mib)
    :ok = MaculaQuic.send(s, payload)
    await_buffered!(ss, 1 + 3 * mib)
    # Up to 1 MiB is copied in the call itself.
    ref = make_ref()
    assert {:ok, "a" <> head} = MaculaQuic.Native.stream_recv(ss, 1000, ref)
    # More is left to the reader on a runtime thread (the call that runs it inline hands the
    # copy on): the call says the answer is being built, and it comes.
    assert :building = MaculaQuic.Native.stream_recv(ss, mib + 1, ref)
    assert_receive {^ref, {:ok, big}}, 5_000
    # So with any timeout, even 0, such data is returned.
    rest = 3 * mib - 999 - (mib + 1)
    assert rest > mib
    assert {:ok, last} = MaculaQuic.recv(ss, rest, 0)
    assert head <> big <> last == payload
    Enum.each([s, ss], &MaculaQuic.close_stream/1)
  end

  test "shards: one per endpoint and per connection, freed with them; client endpoints keep theirs" do
    # Every earlier listener's shard goes once its endpoint's last task has ended.
    endpoints = MaculaQuic.native_counts().client_endpoints
    await_counts!(%{listeners: 0, connections: 0, streams: 0, shards: endpoints}, 30_000)

    # Everything is made and owned by a process that then exits (its handles close with it),
    # so no reference from this process keeps a connection alive.
    during =
      Task.async(fn ->
        {c, sc, l, _} = pair!(addr: "127.0.0.3")
        {_s, _ss} = stream_pair!(c, sc)
        counts = MaculaQuic.native_counts()
        :ok = MaculaQuic.close_connection(c)
        :ok = MaculaQuic.close_listener(l)
        counts
      end)
      |> Task.await()

    # The listener's endpoint, and each end of the connection.
    assert during.shards == during.client_endpoints + 1 + 2

    counts =
      await_counts!(%{listeners: 0, connections: 0, streams: 0, shards: during.client_endpoints})

    assert counts.shards == counts.client_endpoints
  end
end
