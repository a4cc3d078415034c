defmodule MaculaQuic.OwnerTest do
  # Not async: it reads the library's global `owners` count, so nothing else may run meanwhile.
  use ExUnit.Case, async: false
  import MaculaQuic.Test.Quic

  @moduletag :owners

  # Whatever a test leaves open is its owner's, the test process: once that has exited, nothing
  # may be left on the native side, owner entries included (so the next test's count of them
  # starts settled).
  setup do
    on_exit(fn ->
      MaculaQuic.Test.Settle.await_clean!(
        Map.put(MaculaQuic.Test.Settle.zero(), :owners, 0),
        30_000
      )
    end)
  end

  test "a stream whose acceptor has exited goes to the connection's owner, passive, data intact" do
    {c, sc, l, _} = pair!()
    %{owners: owners} = MaculaQuic.native_counts()
    {acceptor, ref} = spawn_monitor(fn -> :ok = MaculaQuic.async_accept_stream(sc) end)
    assert_receive {:DOWN, ^ref, :process, ^acceptor, :normal}, 5_000
    # The library has seen the exit too (its own monitor): the acceptor is no owner any more.
    poll_counts!(&(&1.owners == owners), &"the acceptor's exit was not seen: #{inspect(&1)}")
    {:ok, s} = MaculaQuic.open_stream(c)
    :ok = MaculaQuic.send(s, "hello")
    assert_receive {:quic, :new_stream, ss, %{is_orphan: true, conn: ^sc}}, 5_000
    assert {:ok, "hello"} = MaculaQuic.recv(ss, 5, 5_000)
    :ok = MaculaQuic.send(ss, "back")
    assert_receive {:quic, "back", ^s, _}, 5_000
    Enum.each([s, ss], &MaculaQuic.close_stream/1)
    Enum.each([c, l], &MaculaQuic.close/1)
  end

  test "an owner is monitored once, whatever it owns; its exit closes what it still owns" do
    {l, port} = listen!()
    parent = self()
    keeper = spawn_link(fn -> runner(parent) end)
    %{owners: owners_before} = MaculaQuic.native_counts()

    owner =
      spawn(fn ->
        {own_l, _} = listen!()

        conns =
          for _ <- 1..3 do
            {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
            {:ok, s} = MaculaQuic.open_stream(c)
            :ok = MaculaQuic.send(s, "hi")
            c
          end

        # The last connection goes to `keeper`: the owner's exit must leave it open.
        :ok = MaculaQuic.controlling_process(List.last(conns), keeper)
        send(parent, {:ready, own_l, List.last(conns)})
        receive do: (:never -> :ok)
      end)

    on_exit(fn -> Process.exit(owner, :kill) end)

    server = for _ <- 1..3, do: elem(MaculaQuic.accept(l, [], 5_000), 1)
    assert_receive {:ready, own_l, kept_client}, 5_000
    # One listener, three connections, three streams: one monitor on the process (there used to
    # be one per handle), and one on `keeper`.
    assert {:monitored_by, [_]} = Process.info(owner, :monitored_by)
    assert {:monitored_by, [_]} = Process.info(keeper, :monitored_by)
    assert MaculaQuic.native_counts().owners == owners_before + 2

    Process.exit(owner, :kill)
    # Two of the server's connections hear the owner's exit, and its listener closes.
    assert_receive {:quic, :shutdown, sc, 0}, 5_000
    assert_receive {:quic, :shutdown, sc_, 0}, 5_000
    assert [kept] = server -- [sc, sc_]
    assert {:error, :closed} = MaculaQuic.async_accept(own_l)
    # The owner's entry is gone; `keeper`'s stays while it lives (fell to it, and no lower).
    await_counts!(%{owners: owners_before + 1})
    assert MaculaQuic.native_counts().owners == owners_before + 1

    # The connection `keeper` owns still works, for `keeper`.
    send(
      keeper,
      {:run,
       fn ->
         {:ok, s} = MaculaQuic.open_stream(kept_client)
         MaculaQuic.send(s, "from keeper")
       end}
    )

    assert_receive {:ran, :ok}, 5_000
    assert :ok = accept_stream_with(kept, "from keeper")
    refute_received {:quic, :shutdown, ^kept, _}

    Process.unlink(keeper)
    Process.exit(keeper, :kill)
    assert_receive {:quic, :shutdown, ^kept, 0}, 5_000
    await_counts!(%{owners: owners_before})
  end

  test "handles handed to another process close when that process exits, not the giver" do
    # Whatever earlier tests left must be gone: the counts below are exact.
    %{owners: before} = await_counts!(%{listeners: 0, connections: 0, streams: 0}, 30_000)
    parent = self()
    heir = spawn(fn -> receive do: (:never -> :ok) end)
    on_exit(fn -> Process.exit(heir, :kill) end)

    giver =
      spawn(fn ->
        {c, sc, l, _} = pair!()
        {s, ss} = stream_pair!(c, sc)
        for h <- [c, sc, l, s, ss], do: :ok = MaculaQuic.controlling_process(h, heir)
        send(parent, :handed)
        receive do: (:never -> :ok)
      end)

    on_exit(fn -> Process.exit(giver, :kill) end)

    assert_receive :handed, 5_000
    assert MaculaQuic.native_counts().owners == before + 2
    assert {:monitored_by, [_]} = Process.info(heir, :monitored_by)

    # The giver's exit closes nothing: every handle is the heir's.
    Process.exit(giver, :kill)
    await_counts!(%{owners: before + 1})

    assert %{owners: owners, listeners: 1, connections: 2, streams: 2} =
             MaculaQuic.native_counts()

    assert owners == before + 1

    Process.exit(heir, :kill)
    await_counts!(%{owners: before, listeners: 0, connections: 0, streams: 0})
  end

  test "handles that end by themselves are freed while their owner lives on" do
    # An owner's entry holds its open connections and streams until they end: every way of
    # ending must let go of them, or they would live as long as the owner.
    await_counts!(%{listeners: 0, connections: 0, streams: 0}, 30_000)
    parent = self()
    owner = spawn_link(fn -> runner(parent) end)
    send(owner, {:run, &end_everything/0})
    assert_receive {:ran, :ok}, 15_000
    await_counts!(%{listeners: 0, connections: 0, streams: 0}, 10_000)
    assert Process.alive?(owner)
    assert {:monitored_by, [_]} = Process.info(owner, :monitored_by)
  end

  test "an open listener belongs to its owner even when nothing refers to it any more" do
    await_counts!(%{listeners: 0, connections: 0, streams: 0}, 30_000)
    parent = self()

    owner =
      spawn(fn ->
        {_, port} = listen!()
        send(parent, {:port, port})
        receive do: (:never -> :ok)
      end)

    assert_receive {:port, port}, 5_000
    # Nothing in the owner refers to the listener any more once it is collected.
    :erlang.garbage_collect(owner)
    assert {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn(), verify: :none], 5_000)
    :ok = MaculaQuic.close_connection(c)
    assert MaculaQuic.native_counts().listeners == 1

    # Its owner's exit closes it, and then it is freed.
    Process.exit(owner, :kill)
    await_counts!(%{listeners: 0, connections: 0})
  end

  # Runs the functions it is sent, in its own process, and answers with their results.
  defp runner(parent) do
    receive do
      {:run, f} ->
        send(parent, {:ran, f.()})
        runner(parent)
    end
  end

  # Accepts the peer's streams on `conn` until one carries `data` (the dead owner's aborted
  # stream may come first).
  defp accept_stream_with(conn, data) do
    {:ok, s} = MaculaQuic.accept_stream(conn, [active: false], 5_000)

    case MaculaQuic.recv(s, byte_size(data), 5_000) do
      {:ok, ^data} -> :ok
      _ -> accept_stream_with(conn, data)
    end
  end

  # In one process, both ends: streams finished both ways, closed, reset by the peer; a
  # connection closed here (its peer's end closed by the peer), one ended by idle timeout; a
  # listener closed. Then every message about them is read, so nothing refers to them.
  defp end_everything do
    {c, sc, l, _} = pair!()
    {s1, ss1} = stream_pair!(c, sc, first: "a", server: [active: true])
    :ok = MaculaQuic.send(s1, "", 4)
    assert_receive {:quic, :peer_send_shutdown, ^ss1, _}, 5_000
    :ok = MaculaQuic.send(ss1, "b", 4)
    assert_receive {:quic, :stream_closed, ^ss1, _}, 5_000
    assert_receive {:quic, :stream_closed, ^s1, _}, 5_000

    {s2, ss2} = stream_pair!(c, sc, first: "c")
    :ok = MaculaQuic.close_stream(s2)
    assert_receive {:quic, :stream_closed, ^ss2, _}, 5_000

    {s3, ss3} = stream_pair!(c, sc, first: "d")
    :ok = MaculaQuic.async_shutdown_stream(ss3, MaculaQuic.stream_shutdown_abort(), 7)
    assert_receive {:quic, :stream_closed, ^s3, _}, 5_000
    assert_receive {:quic, :stream_closed, ^ss3, _}, 5_000

    :ok = MaculaQuic.close_connection(c)
    assert_receive {:quic, :closed, ^sc, _}, 5_000

    {ci, sci, li, _} = pair!(listen: [idle_timeout_ms: 200], connect: [idle_timeout_ms: 200])
    assert_receive {:quic, :closed, ^ci, _}, 5_000
    assert_receive {:quic, :closed, ^sci, _}, 5_000

    :ok = MaculaQuic.close_listener(l)
    :ok = MaculaQuic.close_listener(li)
    MaculaQuic.Test.Settle.flush_quic()
    :ok
  end
end
