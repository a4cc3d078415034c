defmodule MaculaQuic.AsyncConnectTest do
  # quicer's async_connect/3: a handle at once, then `connected`, or `transport_shutdown` and
  # `closed`. Not async: the last check of each test reads the library's global counters.
  use ExUnit.Case, async: false
  import MaculaQuic.Test.Quic

  @wait 5_000

  setup_all do
    dir = MaculaQuic.Test.Certs.fresh_dir!("macula_quic_async_connect")
    on_exit(fn -> File.rm_rf!(dir) end)
    {:ok, certs: MaculaQuic.Test.Certs.generate!(dir)}
  end

  setup do
    on_exit(fn -> MaculaQuic.Test.Settle.await_clean!(MaculaQuic.Test.Settle.zero(), 30_000) end)
  end

  # A port nothing listens on yet (a socket's, closed again): an Initial sent there goes
  # unanswered until a listener takes the port.
  defp free_port! do
    {sock, port} = silent_peer!()
    :gen_udp.close(sock)
    port
  end

  # A UDP socket that reads nothing and answers nothing: a handshake to it never completes,
  # so the connecting state lasts as long as the test wants.
  defp silent_peer! do
    {:ok, sock} = :gen_udp.open(0, ip: {127, 0, 0, 1}, active: false)
    {:ok, port} = :inet.port(sock)
    {sock, port}
  end

  for {m, addr} <- [{MaculaQuic, "127.0.0.1"}, {:macula_quic, "::1"}] do
    test "#{inspect(m)}: connected over #{addr}, then the connection works as any other" do
      m = unquote(m)
      {l, port} = listen!(unquote(addr))
      :ok = MaculaQuic.async_accept(l)

      host = if m == :macula_quic, do: String.to_charlist(unquote(addr)), else: unquote(addr)
      assert {:ok, c} = m.async_connect(host, port, alpn: alpn(), verify: :none)
      assert_receive {:quic, :connected, ^c, %{is_resumed: false, alpns: "test"}}, @wait
      assert_receive {:quic, :new_conn, sc, _}, @wait

      {s, ss} = stream_pair!(c, sc, server: [active: true])
      assert_receive {:quic, "hello", ^ss, _}, @wait
      assert {:ok, {_, ^port}} = MaculaQuic.peername(c)
      assert {:ok, [send_cnt: n]} = MaculaQuic.getstat(c, [:send_cnt])
      assert n > 0
      assert {:ok, "test"} = MaculaQuic.negotiated_protocol(c)
      assert :ok = m.handshake(c)
      # `connected` came once.
      refute_received {:quic, :connected, ^c, _}

      Enum.each([s, ss], &MaculaQuic.close_stream/1)
      # The owner's close consumes `closed`, as for a connection from connect/4.
      :ok = MaculaQuic.close_connection(c)
      assert_receive {:quic, :closed, ^sc, _}, @wait
      # Checked once the peer heard of it: a `closed` left over would have come by then.
      refute_received {:quic, :closed, ^c, _}
      :ok = MaculaQuic.close_listener(l)
    end
  end

  test "a name is resolved, as by connect/4" do
    {l, port} = listen!("127.0.0.1")
    :ok = MaculaQuic.async_accept(l)
    {:ok, c} = MaculaQuic.async_connect("localhost", port, alpn: alpn(), verify: :none)
    assert_receive {:quic, :connected, ^c, %{alpns: "test"}}, @wait
    assert_receive {:quic, :new_conn, _sc, _}, @wait
    Enum.each([c, l], &MaculaQuic.close/1)
  end

  test "until connected, calls that need the connection answer :not_connected; closing abandons it" do
    {sock, port} = silent_peer!()
    {:ok, c} = MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), verify: :none)
    # The Initial reached the peer: the handshake is under way (and will never complete).
    assert {:ok, {_, _, _initial}} = :gen_udp.recv(sock, 0, @wait)

    assert {:error, :not_connected} = MaculaQuic.send_dgram(c, "x")
    assert {:error, :not_connected} = MaculaQuic.getstat(c, [:send_cnt])
    assert {:error, :not_connected} = MaculaQuic.getopt(c, :datagram_max_len)
    assert {:error, :not_connected} = MaculaQuic.peername(c)
    assert {:error, :not_connected} = MaculaQuic.async_handshake(c)
    # handshake/1,2,3 do not wait for it either.
    assert {:error, :not_connected} = MaculaQuic.handshake(c)
    assert {:error, :not_connected} = :macula_quic.handshake(c, [], 10)
    assert MaculaQuic.Native.handle_kind(c) == :connection

    # Accepts wait for the handshake too: one that times out meanwhile is withdrawn (and
    # answers nothing later); async_accept_stream/2 is taken.
    assert {:error, :timeout} = MaculaQuic.accept_stream(c, [], 10)
    assert :ok = MaculaQuic.async_accept_stream(c)

    # open_stream/2 and accept_stream/3 wait for the handshake; a close ends the wait with the
    # reason.
    opener = Task.async(fn -> MaculaQuic.open_stream(c) end)
    acceptor = Task.async(fn -> MaculaQuic.accept_stream(c, [], :infinity) end)
    wait_until_waiting!(acceptor.pid)

    # async_shutdown_connection/3 returns at once; the owner hears `closed`, handshake not done.
    :ok = MaculaQuic.async_shutdown_connection(c, 0, 3)
    assert {:error, :closed} = Task.await(opener, @wait)
    assert {:error, :closed} = Task.await(acceptor, @wait)

    assert_receive {:quic, :closed, ^c,
                    %{is_handshake_completed: false, is_app_closing: true, is_peer_acked: false}},
                   @wait

    refute_received {:quic, :transport_shutdown, ^c, _}
    # The async_accept_stream/2 taken before: no stream will come, as quicer says it.
    assert_receive {:quic, :closed, :undefined, :undefined}, @wait
    assert {:error, :closed} = MaculaQuic.open_stream(c)
    assert {:error, :closed} = MaculaQuic.async_accept_stream(c)
    assert :ok = MaculaQuic.close_connection(c)
    refute_received {:quic, _, ^c, _}
    # No late answer to the withdrawn accept (it would come from a runtime thread: a moment is
    # given for it to arrive).
    receive do
      {ref, _} = late when is_reference(ref) -> flunk("a late answer: #{inspect(late)}")
    after
      200 -> :ok
    end

    :gen_udp.close(sock)
  end

  test "open_stream/2 and the accepts before connected wait for the handshake, then work" do
    # The handshake completes only when Quinn sends its Initial again after the listener
    # below has started.
    port = free_port!()

    {:ok, c} = MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), verify: :none)
    test = self()

    opener =
      Task.async(fn ->
        send(test, :opening)
        # The stream is the opener's: hand it over before the task exits.
        with {:ok, s} <- MaculaQuic.open_stream(c),
             :ok <- MaculaQuic.controlling_process(s, test),
             do: {:ok, s}
      end)

    assert_receive :opening
    assert {:error, :not_connected} = MaculaQuic.getstat(c, [:send_cnt])
    # The server's first two streams, accepted before the connection exists: one for this
    # process, one for a waiting accept_stream/3 (its stream handed over as it returns).
    :ok = MaculaQuic.async_accept_stream(c, active: true)

    acceptor =
      Task.async(fn ->
        with {:ok, s} <- MaculaQuic.accept_stream(c, [active: false], 10_000),
             :ok <- MaculaQuic.controlling_process(s, test),
             do: {:ok, s}
      end)

    {:ok, l} = MaculaQuic.listen("127.0.0.1", port, alpn: alpn())
    :ok = MaculaQuic.async_accept(l)

    assert {:ok, s} = Task.await(opener, 10_000)
    assert_receive {:quic, :connected, ^c, _}, @wait
    assert_receive {:quic, :new_conn, sc, _}, @wait
    :ok = MaculaQuic.async_accept_stream(sc)
    :ok = MaculaQuic.send(s, "after the wait")
    assert_receive {:quic, :new_stream, ss, _}, @wait
    assert_receive {:quic, "after the wait", ^ss, _}, @wait

    for text <- ["first", "second"] do
      {:ok, from_server} = MaculaQuic.open_stream(sc)
      :ok = MaculaQuic.send(from_server, text)
    end

    assert_receive {:quic, :new_stream, mine, %{conn: ^c, is_orphan: false}}, @wait
    assert {:ok, theirs} = Task.await(acceptor, @wait)

    assert_receive {:quic, mine_got, ^mine, _}, @wait
    assert {:ok, theirs_got} = MaculaQuic.recv(theirs, 0, @wait)
    assert Enum.sort([mine_got, theirs_got]) == ["first", "second"]
    Enum.each([c, l], &MaculaQuic.close/1)
  end

  # Where the handshake's task panics as the handshake completes: `:task` before the step that
  # makes the handle established; `:establish` inside it, after the handshake can no longer be
  # abandoned; `:established` inside it, with the handle established and its watcher started.
  for at <- [:task, :establish, :established] do
    test "a panic in the handshake's task (#{at}): the owner and waiting calls hear of it, the connection is closed" do
      port = free_port!()

      {:ok, c} = MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), verify: :none)
      :ok = MaculaQuic.Native.debug_panic_handshake(c, unquote(at))
      opener = Task.async(fn -> MaculaQuic.open_stream(c) end)
      {:ok, l} = MaculaQuic.listen("127.0.0.1", port, alpn: alpn())
      :ok = MaculaQuic.async_accept(l)

      # As a panic in Quinn's driver is told, not as a close of the owner's own.
      assert_receive {:quic, :transport_shutdown, ^c, %{status: :internal_error, error: 1}},
                     10_000

      established = unquote(at) == :established

      assert_receive {:quic, :closed, ^c,
                      %{is_handshake_completed: ^established, is_app_closing: false}},
                     @wait

      unless established,
        do: assert({:error, :internal_error} = MaculaQuic.getstat(c, [:send_cnt]))

      assert {:error, :internal_error} = Task.await(opener, @wait)
      refute_received {:quic, :connected, ^c, _}

      # The server's end hears the close at once: the connection was closed, not left open
      # until its idle timeout (30 s).
      assert_receive {:quic, :new_conn, sc, _}, @wait
      assert_receive {:quic, :closed, ^sc, _}, @wait
      :ok = MaculaQuic.close_listener(l)
    end
  end

  test "a watcher dropped before it first runs (its shard failed) still tells the owner" do
    # The failed shard is freed too, once this process's handles are gone.
    on_exit(fn -> shards_freed!() end)
    port = free_port!()
    {:ok, c} = MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), verify: :none)
    :ok = MaculaQuic.Native.debug_panic_handshake(c, :watcher_unrun)
    {:ok, l} = MaculaQuic.listen("127.0.0.1", port, alpn: alpn())
    :ok = MaculaQuic.async_accept(l)

    assert_receive {:quic, :connected, ^c, _}, 10_000

    assert_receive {:quic, :transport_shutdown, ^c, %{status: :internal_error, error: 1}},
                   @wait

    assert_receive {:quic, :closed, ^c, %{is_handshake_completed: true}}, @wait
    # The server's end is left to its own close (the failed shard's connection says nothing).
    assert_receive {:quic, :new_conn, sc, _}, @wait
    MaculaQuic.close(sc)
    :ok = MaculaQuic.close_listener(l)
  end

  test "close_connection/1 by the owner abandons the handshake and consumes closed" do
    {sock, port} = silent_peer!()
    {:ok, c} = MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), verify: :none)
    assert {:ok, _} = :gen_udp.recv(sock, 0, @wait)
    assert :ok = MaculaQuic.close_connection(c)
    # No peer to hear of it here: long enough for a message the close left behind to arrive.
    refute_receive {:quic, :closed, ^c, _}, 100
    refute_received {:quic, :connected, ^c, _}
    :gen_udp.close(sock)
  end

  test "a handshake that outlasts handshake_idle_timeout_ms: connection_timeout, then closed" do
    {sock, port} = silent_peer!()
    t0 = System.monotonic_time(:millisecond)

    {:ok, c} =
      MaculaQuic.async_connect("127.0.0.1", port,
        alpn: alpn(),
        verify: :none,
        handshake_idle_timeout_ms: 300
      )

    # A stream opened, or accepted, meanwhile waits, and gets the handshake's failure.
    opener = Task.async(fn -> MaculaQuic.open_stream(c) end)
    acceptor = Task.async(fn -> MaculaQuic.accept_stream(c, [], :infinity) end)
    :ok = MaculaQuic.async_accept_stream(c)

    assert_receive {:quic, :transport_shutdown, ^c, %{status: :connection_timeout, error: 0}},
                   @wait

    assert {:error, :timeout} = Task.await(opener, @wait)
    assert {:error, :timeout} = Task.await(acceptor, @wait)

    assert System.monotonic_time(:millisecond) - t0 >= 300
    assert_receive {:quic, :closed, ^c, %{is_handshake_completed: false, is_app_closing: false}}
    assert_receive {:quic, :closed, :undefined, :undefined}, @wait
    assert {:error, :timeout} = MaculaQuic.open_stream(c)
    assert {:error, :timeout} = MaculaQuic.handshake(c, 5_000)
    # A close after the end is :ok, and sends nothing more.
    assert :ok = MaculaQuic.close_connection(c)
    refute_received {:quic, _, ^c, _}

    # Quinn's idle timer ending the handshake first is the same status.
    {:ok, c2} =
      MaculaQuic.async_connect("127.0.0.1", port,
        alpn: alpn(),
        verify: :none,
        idle_timeout_ms: 300,
        handshake_idle_timeout_ms: 60_000
      )

    assert_receive {:quic, :transport_shutdown, ^c2, %{status: :connection_timeout}}, @wait
    assert_receive {:quic, :closed, ^c2, %{is_handshake_completed: false}}
    :gen_udp.close(sock)
  end

  test "TLS refusals: an unknown CA and no common ALPN are transport_shutdown with tls_error",
       %{certs: certs} do
    {l, port} = listen!("127.0.0.1", certfile: certs.cert, keyfile: certs.key)
    :ok = MaculaQuic.async_accept(l)

    # A server signed by a CA the client does not trust: unknown_ca (TLS alert 48, QUIC error
    # 0x130).
    {:ok, c} =
      MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), cacertfile: certs.other_ca)

    assert_receive {:quic, :transport_shutdown, ^c, %{status: :tls_error, error: 0x130}}, @wait
    # The client refused the server (nothing came from the peer to close it).
    assert_receive {:quic, :closed, ^c, %{is_handshake_completed: false, is_peer_acked: false}},
                   @wait

    assert {:error, {:tls_alert, :unknown_ca}} = MaculaQuic.open_stream(c)

    # No common ALPN: the server refuses (no_application_protocol, alert 120).
    {:ok, c2} = MaculaQuic.async_connect("127.0.0.1", port, alpn: ["other"], verify: :none)
    assert_receive {:quic, :transport_shutdown, ^c2, %{status: :tls_error, error: 0x178}}, @wait
    # The server refused: its close reached the client.
    assert_receive {:quic, :closed, ^c2, %{is_handshake_completed: false, is_peer_acked: true}},
                   @wait

    refute_received {:quic, :connected, _, _}
    :ok = MaculaQuic.close_listener(l)
  end

  test "controlling_process during the handshake: the new owner gets connected" do
    {sock, port} = silent_peer!()
    {l, lport} = listen!("127.0.0.1")
    :ok = MaculaQuic.async_accept(l)
    test = self()

    heir =
      spawn(fn ->
        receive do
          :go ->
            msg = receive(do: ({:quic, _, _, _} = m -> m), after: (@wait -> :none))
            send(test, {:heir_got, msg})
            receive(do: (:stop -> :ok))
        end
      end)

    on_exit(fn -> Process.exit(heir, :kill) end)

    # First while the handshake cannot complete (the handover happens in the connecting state),
    # then one to the listener, handed over before it can complete.
    {:ok, c0} = MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), verify: :none)
    assert {:ok, _} = :gen_udp.recv(sock, 0, @wait)
    :ok = MaculaQuic.controlling_process(c0, heir)
    assert {:error, :not_owner} = MaculaQuic.controlling_process(c0, self())

    {:ok, c} = MaculaQuic.async_connect("127.0.0.1", lport, alpn: alpn(), verify: :none)
    :ok = MaculaQuic.controlling_process(c, heir)
    send(heir, :go)
    assert_receive {:heir_got, {:quic, :connected, ^c, %{alpns: "test"}}}, @wait
    refute_received {:quic, :connected, ^c, _}

    # The heir exits: both connections end (the connecting one is abandoned, the other closed
    # with code 0, which the server's end hears).
    assert_receive {:quic, :new_conn, sc, _}, @wait
    send(heir, :stop)
    assert_receive {:quic, :shutdown, ^sc, 0}, @wait
    :ok = MaculaQuic.close_listener(l)
    :gen_udp.close(sock)
  end

  test "an owner that exits during the handshake leaves nothing behind" do
    {sock, port} = silent_peer!()
    test = self()

    {pid, ref} =
      spawn_monitor(fn ->
        {:ok, c} = MaculaQuic.async_connect("127.0.0.1", port, alpn: alpn(), verify: :none)
        send(test, {:conn, c})
      end)

    assert_receive {:conn, _c}, @wait
    assert_receive {:DOWN, ^ref, :process, ^pid, :normal}, @wait
    # The Initial went out; the settle check in on_exit proves the handle, its task and its
    # endpoint lease are freed though the handshake never completed.
    assert {:ok, _} = :gen_udp.recv(sock, 0, @wait)
    :gen_udp.close(sock)
  end

  test "bad arguments are answered at once, as by connect/4" do
    assert {:error, :bad_address} = MaculaQuic.async_connect("127.0.0.1", 0, alpn: alpn())
    assert {:error, :bad_address} = MaculaQuic.async_connect("127.0.0.1", 70_000, alpn: alpn())
    assert {:error, :bad_address} = MaculaQuic.async_connect(:nope, 443, alpn: alpn())

    assert {:error, {:bad_option, :alpn}} =
             MaculaQuic.async_connect("127.0.0.1", 443, alpn: :nope)

    assert {:error, {:bad_option, :bogus}} =
             MaculaQuic.async_connect("127.0.0.1", 443, alpn: alpn(), bogus: 1)

    assert {:error, {:bad_option, :server_name}} =
             MaculaQuic.async_connect("127.0.0.1", 443, alpn: alpn(), server_name: "no such name!")

    assert {:error, {:bad_option, :handshake_idle_timeout_ms}} =
             MaculaQuic.async_connect("127.0.0.1", 443,
               alpn: alpn(),
               handshake_idle_timeout_ms: -1
             )

    refute_received {:quic, _, _, _}
  end
end
