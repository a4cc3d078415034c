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

  @tag :inline_only
  @tag :timing
  test "a send does the endpoint's work on the sender's own thread when the endpoint is idle" do
    {c, sc, _l, _} = pair!()
    {s, ss} = stream_pair!(c, sc, first: "a")
    assert_receive {:quic, "a", ^ss, _}, 5_000
    rounds = 200
    # When nothing else runs the endpoint at that moment, each send hands its data to Quinn
    # itself (a direct write: the stream's writer is not woken), runs Quinn's driver, and (the
    # peer being in this VM) receives the datagram it sent and runs the peer's side too: about
    # three inline runs per send (1110-1208 for the 400 sends alone, at the defaults). A worker
    # watching the sockets (runtime_spin_us) sometimes has the endpoint when a send comes, and
    # then keeps its work; on a host busy with other work it can take most of it (189 inline and
    # 679 runtime runs in one CI run). So: at least one inline run per send on average, in one of
    # three tries (with no inline running, every try has none); and at least half the sends
    # written directly, in one of the tries.
    tries = Enum.map(1..3, fn _ -> inline_runs(s, ss, rounds) end)

    IO.puts(
      "\n  #{2 * rounds} sends, per try: #{inspect(tries)} (inline runs, runtime runs, direct writes)"
    )

    assert Enum.any?(tries, fn {inline, _, _} -> inline >= 2 * rounds end), inspect(tries)
    assert Enum.any?(tries, fn {_, _, direct} -> direct >= rounds end), inspect(tries)
  end

  @tag :inline_only
  test "small sends past the peer's window: written directly while Quinn takes them, queued behind once it does not, delivered whole and in order" do
    # The receiver reads nothing until the sender blocks: Quinn takes the sends while the
    # stream's window (2.5 MiB) and the receiver's read-ahead (512 KiB) last, one send then
    # finds no credit and is queued (part of it taken, or none), and every later one queues
    # behind it until `send/2` blocks with 2 MiB waiting. Reading then lets the writer hand the
    # queue over.
    {c, sc, _l, _} = pair!()
    {s, ss} = stream_pair!(c, sc, server: [active: false], first: "a")
    assert {:ok, "a"} = MaculaQuic.recv(ss, 1, 5_000)
    pieces = 6 * 1024
    piece = fn i -> <<i::32, :binary.copy(<<rem(i, 251)>>, 1020)::binary>> end
    %{direct_writes: before} = MaculaQuic.native_counts()
    test = self()

    sender =
      spawn_link(fn ->
        for i <- 1..pieces, do: :ok = MaculaQuic.send(s, piece.(i))
        send(test, :sent)
      end)

    MaculaQuic.Test.Quic.wait_until_waiting!(sender)
    refute_received :sent
    direct = MaculaQuic.native_counts().direct_writes - before
    IO.puts("\n  #{pieces} sends of 1 KiB past the window: #{direct} written directly")
    # Taken in the call, some; past the window (3 MiB of 6), none.
    assert direct > 0 and direct < div(pieces, 2) + 64, "direct writes: #{direct} of #{pieces}"
    assert {:ok, got} = MaculaQuic.recv(ss, 1024 * pieces, 30_000)
    assert_receive :sent, 5_000
    assert got == IO.iodata_to_binary(Enum.map(1..pieces, piece))
    Enum.each([s, ss], &MaculaQuic.close_stream/1)
  end

  # `rounds` round trips of one send each way; the inline and runtime runs they took.
  defp inline_runs(s, ss, rounds) do
    before = MaculaQuic.native_counts()

    for i <- 1..rounds do
      msg = Integer.to_string(i)
      :ok = MaculaQuic.send(s, msg)
      assert_receive {:quic, ^msg, ^ss, _}, 5_000
      :ok = MaculaQuic.send(ss, msg)
      assert_receive {:quic, ^msg, ^s, _}, 5_000
    end

    after_ = MaculaQuic.native_counts()

    {after_.inline_runs - before.inline_runs, after_.runtime_runs - before.runtime_runs,
     after_.direct_writes - before.direct_writes}
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
    shards_freed!()

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
    # The runtime tasks that run shards on runtime workers: at most one each.
    assert during.shard_runners <= during.shards

    counts =
      await_counts!(%{
        listeners: 0,
        connections: 0,
        streams: 0,
        shards: during.client_endpoints,
        # A shard's runner ends when the shard goes.
        shard_runners: during.client_endpoints
      })

    assert counts.shards == counts.client_endpoints
    assert counts.shard_runners <= counts.shards
  end

  describe "calls that ask Quinn about a connection while its driver works on another thread" do
    # The driver of the connection stalls (see `stall!/3`) for @stall ms, holding Quinn's
    # connection lock and its shard on a runtime worker. Each call must return long before
    # that (it used to wait for the lock, holding its scheduler), and its answer then come.
    @stall 600
    @quick_us 200_000

    test "open_stream/2 answers by message, and the stream works" do
      {c, sc, _l, _} = pair!()
      stall!(c)
      ref = make_ref()
      assert :wait = quickly!(fn -> MaculaQuic.Native.open_stream(c, %{}, ref) end)
      assert_receive {^ref, {:ok, s}}, 5_000
      :ok = MaculaQuic.async_accept_stream(sc)
      stream_arrives!(s, "after the stall")
      MaculaQuic.close_connection(c)
    end

    test "send_dgram/2 answers by message, and the datagram arrives" do
      on = [datagram_receive_enabled: true]
      {c, sc, _l, _} = pair!(listen: on, connect: on)
      stall!(c)
      ref = make_ref()
      assert :wait = quickly!(fn -> MaculaQuic.Native.conn_send_dgram(c, "stalled", ref) end)
      assert_receive {^ref, :ok}, 5_000
      assert_receive {:quic, "stalled", ^sc, 0}, 5_000
      MaculaQuic.close_connection(c)
    end

    test "close_connection/1 returns after the close, the owner's `closed` consumed" do
      {c, sc, _l, _} = pair!()
      stall!(c)
      ref = make_ref()
      assert :wait = quickly!(fn -> MaculaQuic.Native.conn_close(c, 0, ref) end)
      assert_receive {^ref, :ok}, 5_000
      assert_receive {:quic, :closed, ^c, _}, 5_000
      assert_receive {:quic, :shutdown, ^sc, 0}, 5_000

      # Through the public function: it waits for the answer and consumes `closed`.
      {c, _sc, _l, _} = pair!()
      stall!(c)
      assert :ok = MaculaQuic.close_connection(c)
      refute_receive {:quic, :closed, ^c, _}, 100
      assert MaculaQuic.close_connection(c) == :ok
    end

    test "async_accept_stream/2 returns, and the stream comes" do
      {c, sc, _l, _} = pair!()
      stall!(sc)
      assert {:ok, _id} = quickly!(fn -> MaculaQuic.Native.conn_accept_stream(sc, %{}, nil) end)
      {:ok, s} = MaculaQuic.open_stream(c)
      stream_arrives!(s, "x")
      MaculaQuic.close_connection(c)
    end

    test "async_accept_stream/2 on a connection that has ended says so at once" do
      {c, sc, _l, _} = pair!()
      :ok = MaculaQuic.close_connection(c)
      assert_receive {:quic, :closed, ^sc, _}, 5_000
      # What Quinn says when the call can ask it...
      assert {:error, reason} = MaculaQuic.Native.conn_accept_stream(sc, %{}, nil)
      # ...and when it cannot, its shard being busy on another thread: the same, from what was
      # recorded as the owner heard `closed` (the caller may have been handed the connection
      # after that message went to its previous owner: it would wait for nothing).
      :ok = MaculaQuic.Native.debug_stall_shard(sc, @stall, self())
      assert_receive :shard_stalled, 5_000

      assert {:error, ^reason} =
               quickly!(fn -> MaculaQuic.Native.conn_accept_stream(sc, %{}, nil) end)
    end

    test "async_accept/2 of a queued connection returns, and new_conn comes" do
      {l, c} = queued_and_stalled!()
      {:ok, {ip, client_port}} = MaculaQuic.sockname(c)
      assert :ok = quickly!(fn -> MaculaQuic.Native.listener_accept(l, nil) end)
      assert_receive {:quic, :new_conn, sc, %{remote_addr: remote}}, 5_000
      assert remote == "#{ip}:#{client_port}"
      same_connection!(c, sc)
      MaculaQuic.close_connection(c)
      MaculaQuic.close_listener(l)
    end
  end

  # A connection queued in a new listener (`{listener, client connection}`) whose driver is
  # stalled on a runtime worker while the accept hands it over. The server's end is queued once
  # its handshake is over: the session ticket it sends then is the last of it (the client can
  # return from `connect` before). With no handle to it, its driver is stalled through its next
  # datagram to the client, which answers the client's nudge.
  defp queued_and_stalled! do
    {l, port} = listen!()
    tickets = MaculaQuic.native_counts().tls_tickets
    {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn(), verify: :none], 5_000)
    poll_counts!(&(&1.tls_tickets > tickets), &"no ticket: #{inspect(&1)}")
    {:ok, client} = MaculaQuic.sockname(c)
    stall_send!(port, client, c)
    {l, c}
  end

  # Calls `nif` and returns its result, once sure it returned long before the stall ended.
  defp quickly!(nif) do
    {us, result} = :timer.tc(nif)
    assert us < @quick_us, "took #{us} µs, returning #{inspect(result)}"
    result
  end

  # Data sent on the new stream `s` reaches the peer, whose process accepts the stream.
  defp stream_arrives!(s, data) do
    :ok = MaculaQuic.send(s, data)
    assert_receive {:quic, :new_stream, ss, _}, 5_000
    assert_receive {:quic, ^data, ^ss, _}, 5_000
  end

  # Makes `conn`'s driver send a datagram from a runtime worker and stall inside the send for
  # @stall ms; returns once it stalls.
  defp stall!(conn) do
    {:ok, {_, local_port}} = MaculaQuic.sockname(conn)
    {:ok, peer} = MaculaQuic.peername(conn)
    stall_send!(local_port, peer, conn)
  end

  # Stalls, for @stall ms, the next datagram a runtime worker sends from the library's socket
  # on `local_port` to `{ip, port}`, which nudging the driver of `nudge` (that connection, or
  # its peer) brings about; returns once it stalls.
  defp stall_send!(local_port, {ip, port}, nudge) do
    :ok = MaculaQuic.Native.debug_stall_send_from(local_port, ip, port, @stall, self())
    :ok = MaculaQuic.Native.debug_nudge_driver(nudge)
    assert_receive :driver_stalled, 5_000
  end
end
