defmodule MaculaQuic.DatagramTest do
  # Not async: the last test reads the library's global counters.
  use ExUnit.Case, async: false
  import Bitwise
  import MaculaQuic.Test.Quic

  @moduletag :datagrams

  @on [datagram_receive_enabled: true]

  # Whatever a test leaves open is its owner's, the test process: once that has exited, nothing
  # may be left on the native side (the datagram readers are tasks, and hold their connections).
  setup do
    on_exit(fn -> MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero(), 30_000) end)
  end

  for addr <- ["127.0.0.1", "::1"] do
    test "datagrams both ways over #{addr}, after dgram_state_changed at both ends" do
      {c, sc, l, _} = pair!(addr: unquote(addr), listen: @on, connect: @on)

      for conn <- [c, sc] do
        assert_receive {:quic, :dgram_state_changed, ^conn,
                        %{dgram_send_enabled: true, dgram_max_len: max}},
                       5_000

        # Quinn's floor for a peer that accepts datagrams, and at most a loopback packet.
        assert max >= 1_000 and max < 65_536
      end

      assert :ok = MaculaQuic.send_dgram(c, "ping")
      assert_receive {:quic, "ping", ^sc, 0}, 5_000
      # iodata, from the server's end.
      assert :ok = MaculaQuic.send_dgram(sc, ["po", ?n, "g"])
      assert_receive {:quic, "pong", ^c, 0}, 5_000
      # Empty datagrams are datagrams too.
      assert :ok = MaculaQuic.send_dgram(c, "")
      assert_receive {:quic, "", ^sc, 0}, 5_000
      # Streams are unaffected, and tell their data apart by the handle.
      {s, ss} = stream_pair!(c, sc, first: "on a stream")
      assert_receive {:quic, "on a stream", ^ss, _}, 5_000
      Enum.each([s, ss], &MaculaQuic.close_stream/1)
      Enum.each([c, l], &MaculaQuic.close/1)
    end
  end

  test "a datagram of dgram_max_len arrives whole; one over any packet's size is too large" do
    {c, sc, l, _} = pair!(listen: @on, connect: @on)
    assert_receive {:quic, :dgram_state_changed, ^c, %{dgram_max_len: max}}, 5_000
    payload = :crypto.strong_rand_bytes(max)
    assert :ok = MaculaQuic.send_dgram(c, payload)
    assert_receive {:quic, ^payload, ^sc, 0}, 5_000
    # The limit grows as Quinn finds larger packets pass, up to its largest UDP payload (1452
    # bytes, which also holds the packet's header and the datagram's frame).
    assert {:error, :too_large} = MaculaQuic.send_dgram(c, :binary.copy("x", 1_452))
    # Over any packet's size, refused before it is copied.
    assert {:error, :too_large} = MaculaQuic.send_dgram(c, :binary.copy("x", 70_000))
    # The connection goes on.
    assert :ok = MaculaQuic.send_dgram(c, "still here")
    assert_receive {:quic, "still here", ^sc, 0}, 5_000
    Enum.each([c, l], &MaculaQuic.close/1)
  end

  test "getopt tells any process whether, and how large, datagrams may be sent now" do
    {c, sc, l, _} = pair!(listen: @on, connect: @on)

    assert_receive {:quic, :dgram_state_changed, ^c,
                    %{dgram_send_enabled: true, dgram_max_len: announced}},
                   5_000

    assert {:ok, true} = MaculaQuic.getopt(c, :datagram_send_enabled)
    assert {:ok, true} = MaculaQuic.getopt(sc, :datagram_send_enabled)
    # The limit only grows on loopback (Quinn finds larger packets pass).
    assert {:ok, max} = MaculaQuic.getopt(c, :datagram_max_len)
    assert max >= announced and max < 1_452

    # It is the limit: that much arrives whole, a byte more is refused (unless the path grew
    # meanwhile, which the second reading shows).
    payload = :crypto.strong_rand_bytes(max)
    assert :ok = MaculaQuic.send_dgram(c, payload)
    assert_receive {:quic, ^payload, ^sc, 0}, 5_000
    over = MaculaQuic.send_dgram(c, :binary.copy("x", max + 1))
    {:ok, again} = MaculaQuic.getopt(c, :datagram_max_len)
    assert over == {:error, :too_large} or again > max

    # Any process may ask, not only the owner the announcement went to (the limit may have
    # grown again meanwhile).
    assert {:ok, {true, len}} =
             Task.await(
               Task.async(fn ->
                 {:ok, enabled} = MaculaQuic.getopt(c, :datagram_send_enabled)
                 {:ok, len} = MaculaQuic.getopt(c, :datagram_max_len)
                 {:ok, {enabled, len}}
               end)
             )

    assert len >= again

    # Once the connection has ended, none may be sent, at either end.
    :ok = MaculaQuic.close_connection(c, 0, 7)
    assert_receive {:quic, :closed, ^sc, _}, 5_000

    for conn <- [c, sc] do
      assert {:ok, false} = MaculaQuic.getopt(conn, :datagram_send_enabled)
      assert {:ok, 0} = MaculaQuic.getopt(conn, :datagram_max_len)
    end

    MaculaQuic.close(l)
  end

  test "without the option at both ends there are no datagrams, and the end without it is told nothing" do
    # Only the client accepts datagrams.
    {c, sc, l, _} = pair!(connect: @on)
    # The client hears the server does not accept them...
    assert_receive {:quic, :dgram_state_changed, ^c,
                    %{dgram_send_enabled: false, dgram_max_len: 0}},
                   5_000

    assert {:error, :unsupported_by_peer} = MaculaQuic.send_dgram(c, "to a server that refuses")
    # ...while the server, made without the option, may not send them (Quinn's rule) and is
    # told nothing of them.
    assert {:error, :datagrams_disabled} = MaculaQuic.send_dgram(sc, "to the client")
    refute_received {:quic, :dgram_state_changed, ^sc, _}
    # Asked, both ends say they may send none: the client because the server refuses them, the
    # server because it was made without them (though its peer accepts them).
    for conn <- [c, sc] do
      assert {:ok, false} = MaculaQuic.getopt(conn, :datagram_send_enabled)
      assert {:ok, 0} = MaculaQuic.getopt(conn, :datagram_max_len)
    end

    assert {:ok, true} = MaculaQuic.getopt(c, :datagram_receive_enabled)
    assert {:ok, false} = MaculaQuic.getopt(sc, :datagram_receive_enabled)
    # quicer's spelling, from Erlang.
    assert {:ok, false} = :macula_quic.getopt(sc, :datagram_receive_enabled, false)

    Enum.each([c, l], &MaculaQuic.close/1)

    # The default at both ends.
    {c, sc, l, _} = pair!()
    assert {:error, :datagrams_disabled} = MaculaQuic.send_dgram(c, "x")
    assert {:error, :datagrams_disabled} = MaculaQuic.send_dgram(sc, "x")
    refute_received {:quic, :dgram_state_changed, _, _}
    Enum.each([c, l], &MaculaQuic.close/1)

    # quicer's 1 and 0 are taken for true and false.
    {c, sc, l, _} =
      pair!(listen: [datagram_receive_enabled: 1], connect: [datagram_receive_enabled: 0])

    assert_receive {:quic, :dgram_state_changed, ^sc, %{dgram_send_enabled: false}}, 5_000
    assert {:error, :datagrams_disabled} = MaculaQuic.send_dgram(c, "zero")
    assert {:error, :unsupported_by_peer} = MaculaQuic.send_dgram(sc, "one")
    Enum.each([c, l], &MaculaQuic.close/1)
  end

  test "a send that finds others waiting for room waits behind them: small datagrams cannot starve a large one" do
    {l, port} = listen!("127.0.0.1", @on)
    :ok = MaculaQuic.async_accept(l)
    # Through a relay that can hold the acknowledgements back: the congestion window then
    # stays full, and datagrams collect in Quinn's send buffer (1 MiB).
    relay = relay!(port)
    opts = [alpn: alpn(), verify: :none] ++ @on
    {:ok, c} = MaculaQuic.connect("127.0.0.1", relay.port, opts, 5_000)
    assert_receive {:quic, :new_conn, sc, _}, 5_000
    relay.back.(false)

    # Fill the buffer with 1,000-byte datagrams until one must wait for room (the native call
    # answers :wait, then {tag, result} once Quinn has it, where send_dgram/2 would block).
    # Quinn counts each as 1,032 bytes, so 64 bytes stay free: room for a one-byte datagram,
    # not for a large one.
    {filled, tag} = fill!(c, :binary.copy("x", 1_000), 0)
    assert filled > 100

    # A one-byte datagram would fit, but the large one asked first: it waits too.
    small = make_ref()
    assert :wait = MaculaQuic.Native.conn_send_dgram(c, "y", small)
    refute_received {^small, _}

    # With the acknowledgements let through, both go, the large one first (as they would
    # if a loss probe, which Quinn sends now and then meanwhile, made room).
    relay.back.(true)

    receive do
      {^tag, :ok} -> :ok
      {^small, _} -> flunk("the one-byte datagram went before the large one")
    after
      10_000 -> flunk("the large datagram was never sent")
    end

    assert_receive {^small, :ok}, 10_000
    assert_receive {:quic, "y", ^sc, 0}, 10_000
    Enum.each([c, l], &MaculaQuic.close/1)
    relay.stop.()
  end

  test "a send queued as its connection's shard fails is answered, not left waiting" do
    # The failed shard is freed too, once this process's handles are gone.
    on_exit(fn -> shards_freed!() end)
    {c, sc, l, _} = pair!(listen: @on, connect: @on)
    # The shard busy on another thread: the send queues for a task, which the shard, failing
    # (as after a panic in Quinn's driver) as that task is spawned, drops before it first runs.
    :ok = MaculaQuic.Native.debug_stall_shard(c, 1_000, self())
    assert_receive :shard_stalled, 5_000
    :ok = MaculaQuic.Native.debug_fail_shard_on_spawn(c)
    tag = make_ref()
    assert :wait = MaculaQuic.Native.conn_send_dgram(c, "x", tag)
    assert_receive {^tag, {:error, reason}}, 5_000
    assert reason in [:closed, :internal_error]
    # Later sends say the connection is gone.
    assert {:error, :closed} = MaculaQuic.send_dgram(c, "y")
    Enum.each([sc, c, l], &MaculaQuic.close/1)
  end

  # Sends until a datagram waits for room: a :wait answered at once only found the connection
  # busy on another thread (or room made by a loss probe, which Quinn sends at growing
  # intervals while no acknowledgement comes); one unanswered for 100 ms waits for room.
  defp fill!(c, data, sent) do
    tag = make_ref()

    case MaculaQuic.Native.conn_send_dgram(c, data, tag) do
      :ok when sent < 10_000 ->
        fill!(c, data, sent + 1)

      :wait ->
        receive do
          {^tag, :ok} -> fill!(c, data, sent + 1)
        after
          100 -> {sent, tag}
        end

      other ->
        flunk("after #{sent} datagrams: #{inspect(other)}")
    end
  end

  test "datagrams go to the owner of the moment, and none follows closed" do
    {c, sc, l, _} = pair!(listen: @on, connect: @on)
    # The listener's accept loop is a task too: with it gone, the count of tasks falls to 0 once
    # the connection's are over (its delivered connection lives on).
    :ok = MaculaQuic.close_listener(l)
    test = self()

    # A new owner of the server's end collects what comes until `closed`, then what follows
    # until the library's tasks for the connection are gone.
    owner =
      spawn_link(fn ->
        receive do: (:go -> :ok)
        send(test, {:collected, collect([])})
      end)

    :ok = MaculaQuic.controlling_process(sc, owner)
    send(owner, :go)
    # A burst, then the client closes with datagrams still on their way.
    for i <- 1..200, do: :ok = MaculaQuic.send_dgram(c, <<i::32>>)
    :ok = MaculaQuic.close_connection(c, 0, 7)
    assert_receive {:collected, {got, after_closed}}, 10_000
    # Over loopback at this rate they arrive (a few lost would not be wrong, none is usual).
    assert length(got) > 0
    assert Enum.all?(got, &match?(<<i::32>> when i in 1..200, &1))
    assert after_closed == []
    # Nothing of it reached the old owner.
    refute_received {:quic, <<_::32>>, ^sc, 0}
  end

  defp collect(acc) do
    receive do
      {:quic, :dgram_state_changed, _, _} ->
        collect(acc)

      {:quic, data, _conn, 0} when is_binary(data) ->
        collect([data | acc])

      {:quic, :shutdown, _, 7} ->
        collect(acc)

      {:quic, :closed, _, _} ->
        # The connection's tasks (its datagram reader among them) end; nothing may come after.
        MaculaQuic.Test.Quic.await_counts!(%{tasks: 0}, 10_000)

        late =
          receive do
            {:quic, data, _, 0} when is_binary(data) -> [data]
          after
            0 -> []
          end

        {Enum.reverse(acc), late}
    after
      10_000 -> {Enum.reverse(acc), [:no_closed]}
    end
  end

  test "a sender that floods gets :ok for every datagram, and the connection stays usable" do
    {c, sc, l, _} = pair!(listen: @on, connect: @on)
    assert_receive {:quic, :dgram_state_changed, ^c, %{dgram_max_len: max}}, 5_000
    # 8 MiB of datagrams from a loop: more than Quinn's 1 MiB send buffer, which fills when
    # the sender outruns the path, and the call then waits for room instead of Quinn dropping
    # what it had queued.
    payload = :binary.copy("d", max)
    n = div(8 * 1_048_576, max)
    assert Enum.all?(1..n, fn _ -> MaculaQuic.send_dgram(c, payload) == :ok end)
    # Quinn dropped none of them to make room: every one was sent.
    assert wait_until(fn -> frames_tx(c) >= n end, 500), "#{frames_tx(c)} of #{n} sent"
    # Each arrives whole; stop at the first sign that the burst is over.
    received = count_datagrams(sc, payload, 0)
    assert received > 0 and received <= n
    IO.puts("\n  #{n} datagrams of #{max} bytes sent, #{received} received")
    assert :ok = MaculaQuic.send_dgram(c, "after the flood")
    assert_receive {:quic, "after the flood", ^sc, 0}, 5_000
    Enum.each([c, l], &MaculaQuic.close/1)
  end

  defp count_datagrams(sc, payload, n) do
    receive do
      {:quic, ^payload, ^sc, 0} ->
        count_datagrams(sc, payload, n + 1)

      {:quic, other, ^sc, 0} when is_binary(other) ->
        flunk("a datagram changed: #{byte_size(other)} bytes")
    after
      1_000 -> n
    end
  end

  test "datagram_active: a passive owner's datagrams wait, bounded by datagram_receive_buffer, newest kept; :once and N deliver that many" do
    # Quinn keeps 100,000 bytes of datagrams for the owner, counting each as its length + 32.
    buffer = 100_000

    {c, sc, l, _} =
      pair!(
        listen: @on ++ [datagram_active: false, datagram_receive_buffer: buffer],
        connect: @on
      )

    assert {:ok, false} = MaculaQuic.getopt(sc, :datagram_active)
    assert {:ok, true} = MaculaQuic.getopt(c, :datagram_active)
    # A flood of 2,000 datagrams of 1,000 bytes (2 MB) while the owner takes none.
    for i <- 1..2_000, do: :ok = MaculaQuic.send_dgram(c, <<i::32, 0::size(996 * 8)>>)
    # Everything that will reach the server's Quinn has, once its count stops moving.
    rx = await_settled!(fn -> frames_rx(sc) end, 50, 200, &"still arriving: #{&1}")
    assert rx > 400, "only #{rx} of 2,000 datagrams arrived: too few to fill the buffer"
    refute_received {:quic, <<_::32, _::binary>>, ^sc, 0}
    :ok = MaculaQuic.setopt(sc, :datagram_active, true)
    got = for <<i::32, _::binary>> <- drain(sc, []), do: i

    IO.puts(
      "\n  2000 datagrams sent to a passive owner, #{rx} arrived, #{length(got)} delivered once active"
    )

    # One held, and what the buffer kept: the newest (kept oldest, they would be 1..n).
    assert length(got) >= 2 and length(got) <= 1 + div(buffer, 1_000 + 32)
    assert Enum.max(got) > length(got)

    # :once delivers one and stops.
    :ok = MaculaQuic.setopt(sc, :datagram_active, :once)
    for d <- ["x", "y", "z"], do: :ok = MaculaQuic.send_dgram(c, d)

    assert wait_until(fn -> frames_rx(sc) >= rx + 3 end, 500),
           "#{frames_rx(sc) - rx} of 3 arrived"

    assert_receive {:quic, first, ^sc, 0} when first in ["x", "y", "z"], 5_000
    refute_receive {:quic, _, ^sc, 0}, 100
    assert {:ok, false} = MaculaQuic.getopt(sc, :datagram_active)
    # N adds to a budget; when it runs out the owner is told.
    :ok = MaculaQuic.setopt(sc, :datagram_active, 2)
    assert_receive {:quic, second, ^sc, 0}, 5_000
    assert_receive {:quic, third, ^sc, 0}, 5_000
    assert Enum.sort([first, second, third]) == ["x", "y", "z"]
    assert_receive {:quic, :passive, ^sc, :undefined}, 5_000
    # A negative N that brings the budget to zero stops delivery at once, and says so.
    :ok = MaculaQuic.setopt(sc, :datagram_active, 5)
    :ok = MaculaQuic.setopt(sc, :datagram_active, -5)
    assert_received {:quic, :passive, ^sc, :undefined}
    assert {:ok, false} = MaculaQuic.getopt(sc, :datagram_active)

    for bad <- [:always, 1 <<< 40, "true"] do
      assert {:error, {:bad_option, :datagram_active}} =
               MaculaQuic.setopt(sc, :datagram_active, bad)
    end

    # Without datagrams these options mean nothing: refused. So is a buffer out of range.
    assert {:error, {:bad_option, :datagram_active}} =
             MaculaQuic.listen("127.0.0.1", 0, alpn: alpn(), datagram_active: :once)

    assert {:error, {:bad_option, :datagram_receive_buffer}} =
             MaculaQuic.listen("127.0.0.1", 0, alpn: alpn(), datagram_receive_buffer: 100_000)

    for bad <- [100, 1 <<< 40, -1, :big] do
      assert {:error, {:bad_option, :datagram_receive_buffer}} =
               MaculaQuic.listen(
                 "127.0.0.1",
                 0,
                 @on ++ [alpn: alpn(), datagram_receive_buffer: bad]
               )
    end

    Enum.each([c, l], &MaculaQuic.close/1)
  end

  test "datagrams held for a passive owner when the connection closes are dropped, not delivered" do
    {c, sc, l, _} = pair!(listen: @on ++ [datagram_active: false], connect: @on)
    # The listener's accept loop is a task: without it the count falls to 0 once the
    # connection's tasks (the datagram reader among them) are over.
    :ok = MaculaQuic.close_listener(l)
    for i <- 1..10, do: :ok = MaculaQuic.send_dgram(c, <<i::32>>)
    # Held (one) and buffered (the rest) for the owner, who takes none.
    assert wait_until(fn -> frames_rx(sc) >= 10 end, 500), "#{frames_rx(sc)} of 10 arrived"
    :ok = MaculaQuic.close_connection(c, 0, 7)
    assert_receive {:quic, :closed, ^sc, _}, 5_000
    # Turning active after `closed` brings nothing: what waited went with the connection.
    :ok = MaculaQuic.setopt(sc, :datagram_active, true)
    await_counts!(%{tasks: 0}, 10_000)
    refute_received {:quic, <<_::32>>, ^sc, 0}
    assert_received {:quic, :shutdown, ^sc, 7}
  end

  defp frames_rx(conn) do
    {:ok, [datagram_frames_rx: n]} = MaculaQuic.getstat(conn, [:datagram_frames_rx])
    n
  end

  defp frames_tx(conn) do
    {:ok, [datagram_frames_tx: n]} = MaculaQuic.getstat(conn, [:datagram_frames_tx])
    n
  end

  # The datagrams that come to `conn` until none has for a second.
  defp drain(conn, acc) do
    receive do
      {:quic, data, ^conn, 0} when is_binary(data) -> drain(conn, [data | acc])
    after
      1_000 -> Enum.reverse(acc)
    end
  end

  test "bad input: wrong handles and data raise, bad option values are refused, ended connections say so" do
    {c, sc, l, _} = pair!(listen: @on, connect: @on)
    {s, ss} = stream_pair!(c, sc)

    assert_raise ArgumentError, ~r/expected a connection handle, got: .* \(a stream\)/, fn ->
      MaculaQuic.send_dgram(s, "x")
    end

    assert_raise ArgumentError, ~r/\(a listener\)/, fn -> MaculaQuic.send_dgram(l, "x") end

    assert_raise ArgumentError, ~r/not a macula_quic handle/, fn ->
      MaculaQuic.send_dgram(:c, "x")
    end

    assert_raise ArgumentError, ~r/expected iodata/, fn -> MaculaQuic.send_dgram(c, :atom) end
    assert_raise ArgumentError, ~r/expected iodata/, fn -> MaculaQuic.send_dgram(c, [1000]) end

    assert_raise ArgumentError, ~r/expected iodata/, fn ->
      MaculaQuic.send_dgram(c, ["a" | :b])
    end

    # A large iolist is refused as too large, without being flattened.
    assert {:error, :too_large} = MaculaQuic.send_dgram(c, List.duplicate("0123456789", 7_000))

    for bad <- [2, -1, "yes", :maybe, 1.0] do
      assert {:error, {:bad_option, :datagram_receive_enabled}} =
               MaculaQuic.listen("127.0.0.1", 0, alpn: alpn(), datagram_receive_enabled: bad)

      assert {:error, {:bad_option, :datagram_receive_enabled}} =
               MaculaQuic.connect(
                 "127.0.0.1",
                 1,
                 [alpn: alpn(), datagram_receive_enabled: bad],
                 1_000
               )
    end

    Enum.each([s, ss], &MaculaQuic.close_stream/1)
    :ok = MaculaQuic.close_connection(c)
    assert {:error, :closed} = MaculaQuic.send_dgram(c, "x")
    assert_receive {:quic, :closed, ^sc, _}, 5_000
    assert {:error, {:shutdown, 0}} = MaculaQuic.send_dgram(sc, "x")
    # The Erlang face is the same function.
    assert {:error, :closed} = :macula_quic.send_dgram(c, "x")
    MaculaQuic.close(l)
  end
end
