defmodule MaculaQuicTest do
  use ExUnit.Case, async: true
  import MaculaQuic.Test.Quic
  doctest MaculaQuic

  @moduletag :api

  setup_all do
    dir = MaculaQuic.Test.Certs.fresh_dir!("macula_quic_certs")
    certs = MaculaQuic.Test.Certs.generate!(dir)
    on_exit(fn -> File.rm_rf!(dir) end)
    {:ok, certs: certs}
  end

  describe "listen/2,3 and sockname/1" do
    test "accepts every address form and reports the bound address" do
      for {addr, expect} <- [
            {"127.0.0.1", "127.0.0.1"},
            {~c"127.0.0.1", "127.0.0.1"},
            {{127, 0, 0, 1}, "127.0.0.1"},
            {"::1", "::1"},
            {{0, 0, 0, 0, 0, 0, 0, 1}, "::1"},
            {"[::1]", "::1"}
          ] do
        {:ok, l} = MaculaQuic.listen(addr, 0, alpn: alpn())
        assert {:ok, {^expect, port}} = MaculaQuic.sockname(l)
        assert port in 1..65_535
        :ok = MaculaQuic.close_listener(l)
      end

      {:ok, l} = MaculaQuic.listen({"127.0.0.1", 0}, alpn: alpn())
      {:ok, {"127.0.0.1", port}} = MaculaQuic.sockname(l)
      :ok = MaculaQuic.close_listener(l)
      {:ok, l} = MaculaQuic.listen("127.0.0.1:#{port}", alpn: alpn())
      assert {:ok, {"127.0.0.1", ^port}} = MaculaQuic.sockname(l)
      :ok = MaculaQuic.close_listener(l)
      {:ok, l} = MaculaQuic.listen(~c"[::1]:#{port}", alpn: alpn())
      assert {:ok, {"::1", ^port}} = MaculaQuic.sockname(l)
      :ok = MaculaQuic.close_listener(l)
    end

    test "a bare port listens on every address" do
      {:ok, l} = MaculaQuic.listen(0, alpn: alpn())
      {:ok, {ip, port}} = MaculaQuic.sockname(l)
      assert ip in ["::", "0.0.0.0"]
      :ok = MaculaQuic.async_accept(l)
      {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
      assert_receive {:quic, :new_conn, _, %{local_addr: "127.0.0.1:" <> _}}, 5_000
      MaculaQuic.close_connection(c)
    end

    test "bad addresses and options are errors, not crashes" do
      assert {:error, :bad_address} = MaculaQuic.listen("not an ip", 0, alpn: alpn())
      assert {:error, :bad_address} = MaculaQuic.listen("127.0.0.1", 70_000, alpn: alpn())
      assert {:error, :bad_address} = MaculaQuic.listen({1, 2, 3}, 0, alpn: alpn())
      assert {:error, {:missing_option, :alpn}} = MaculaQuic.listen("127.0.0.1", 0, [])
      assert {:error, {:bad_option, :alpn}} = MaculaQuic.listen("127.0.0.1", 0, alpn: "test")
      assert {:error, {:bad_option, :alpn}} = MaculaQuic.listen("127.0.0.1", 0, alpn: [])

      assert {:error, {:bad_option, :frobnicate}} =
               MaculaQuic.listen("127.0.0.1", 0, alpn: alpn(), frobnicate: 1)

      assert {:error, {:bad_option, :idle_timeout_ms}} =
               MaculaQuic.listen("127.0.0.1", 0, alpn: alpn(), idle_timeout_ms: -1)

      assert {:error, {:bad_option, {"x", 1}}} = MaculaQuic.listen("127.0.0.1", 0, [{"x", 1}])
      assert {:error, {:bad_option, "x"}} = MaculaQuic.listen("127.0.0.1", 0, %{"x" => 1})

      assert {:error, {:certfile, :enoent}} =
               MaculaQuic.listen("127.0.0.1", 0,
                 alpn: alpn(),
                 certfile: "/nonexistent.pem",
                 keyfile: "/nonexistent.pem"
               )
    end

    test "options may be a map or a proplist", %{certs: certs} do
      {:ok, l} =
        MaculaQuic.listen("127.0.0.1", 0, %{
          alpn: alpn(),
          certfile: certs.cert,
          keyfile: certs.key
        })

      :ok = MaculaQuic.close_listener(l)

      {:ok, l} =
        MaculaQuic.listen("127.0.0.1", 0, [
          {:alpn, [~c"test"]},
          {:cert, certs.cert_der},
          {:key, certs.key_der}
        ])

      :ok = MaculaQuic.close_listener(l)
    end

    test "two listeners on one port and different addresses each see only their own traffic" do
      {a, port} = listen!("127.0.0.1")
      {:ok, b} = MaculaQuic.listen("127.0.0.2", port, alpn: alpn())
      assert {:error, :eaddrinuse} = MaculaQuic.listen("127.0.0.2", port, alpn: alpn())

      parent = self()

      for {l, name} <- [{a, :a}, {b, :b}] do
        spawn_link(fn ->
          :ok = MaculaQuic.async_accept(l)

          receive do
            {:quic, :new_conn, _c, info} -> send(parent, {name, info.local_addr})
          end
        end)
      end

      {:ok, c2} = MaculaQuic.connect("127.0.0.2", port, [alpn: alpn()], 5_000)
      assert_receive {:b, "127.0.0.2:" <> _}, 5_000
      refute_received {:a, _}
      {:ok, c1} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
      assert_receive {:a, "127.0.0.1:" <> _}, 5_000
      Enum.each([c1, c2], &MaculaQuic.close_connection/1)
    end
  end

  describe "accepting connections" do
    test "one new_conn per async_accept call; connections that arrive early are queued" do
      {l, port} = listen!()
      {:ok, c1} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
      {:ok, c2} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
      refute_received {:quic, :new_conn, _, _}
      :ok = MaculaQuic.async_accept(l)
      assert_receive {:quic, :new_conn, s1, info}, 5_000
      refute_receive {:quic, :new_conn, _, _}, 100
      assert %{alpns: "test", remote_addr: "127.0.0.1:" <> _, local_addr: local} = info
      assert local == "127.0.0.1:#{port}"
      assert :ok = MaculaQuic.handshake(s1)
      assert {:ok, s2} = MaculaQuic.accept(l, [], 5_000)
      assert is_reference(s2)
      assert {:error, :timeout} = MaculaQuic.accept(l, [], 50)
      Enum.each([c1, c2], &MaculaQuic.close_connection/1)
    end

    test "beyond :backlog connections waiting, the next is refused; an accept frees a slot" do
      {l, port} = listen!("127.0.0.1", backlog: 2)
      {:ok, c1} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
      {:ok, c2} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)

      assert {:error, :connection_refused} =
               MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)

      assert {:ok, s1} = MaculaQuic.accept(l, [], 5_000)
      {:ok, c3} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
      assert {:ok, s2} = MaculaQuic.accept(l, [], 5_000)
      assert {:ok, s3} = MaculaQuic.accept(l, [], 5_000)
      # One accepted connection per client. (They queue in the order the server finished their
      # handshakes, which on a busy host need not be the order the clients' connects returned.)
      assert Enum.sort(server_sides([c1, c2, c3], [s1, s2, s3])) == Enum.sort([s1, s2, s3])
    end

    test "a client that connects and closes at once is still handed over, then closed" do
      # Its close often reaches the server with the end of the handshake: the server's
      # connection is then closed by the time the listener looks at it, and still counts as
      # connected (as with quicer, and as `:gen_tcp.accept/1` returns a socket whose peer
      # has closed).
      {l, port} = listen!()

      for _ <- 1..20 do
        :ok = MaculaQuic.async_accept(l)
        {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn(), verify: :none], 5_000)
        :ok = MaculaQuic.close_connection(c)
        assert_receive {:quic, :new_conn, sc, _}, 5_000
        assert_receive {:quic, :closed, ^sc, _}, 5_000
      end
    end

    test "processes waiting in async_accept hear listener_stopped as the listener closes" do
      parent = self()

      # Waits in async_accept (`n` times), then forwards whatever it gets.
      acceptor = fn l, n ->
        pid =
          spawn_link(fn ->
            for _ <- 1..n, do: :ok = MaculaQuic.async_accept(l)
            send(parent, {:waiting, self()})

            forward = fn forward ->
              receive(do: (msg -> send(parent, {:got, self(), msg}))) && forward.(forward)
            end

            forward.(forward)
          end)

        assert_receive {:waiting, ^pid}, 5_000
        pid
      end

      # The owner closes it: each other waiting process is told, once however often it
      # waited; the owner, waiting too, hears nothing of its own close.
      {l, _} = listen!()
      :ok = MaculaQuic.async_accept(l)
      a = acceptor.(l, 2)
      b = acceptor.(l, 1)
      :ok = MaculaQuic.close_listener(l)
      assert_receive {:got, ^a, {:quic, :listener_stopped, ^l}}, 5_000
      assert_receive {:got, ^b, {:quic, :listener_stopped, ^l}}, 5_000

      # A waiting process that closes it is not told either; the owner is, as before.
      {l2, _} = listen!()

      closer =
        spawn_link(fn ->
          :ok = MaculaQuic.async_accept(l2)
          :ok = MaculaQuic.close_listener(l2)
          send(parent, {:closed, self()})
          receive(do: (msg -> send(parent, {:got, self(), msg})))
        end)

      assert_receive {:closed, ^closer}, 5_000
      assert_receive {:quic, :listener_stopped, ^l2}, 5_000

      # The owner exits: the processes waiting on its listener are told.
      owner =
        spawn(fn ->
          {l3, _} = listen!()
          send(parent, {:listener, l3})
          receive(do: (:exit -> :ok))
        end)

      assert_receive {:listener, l3}, 5_000
      c = acceptor.(l3, 1)
      ref = Process.monitor(owner)
      send(owner, :exit)
      assert_receive {:DOWN, ^ref, :process, ^owner, _}, 5_000
      assert_receive {:got, ^c, {:quic, :listener_stopped, ^l3}}, 5_000

      # Nothing else came: no second message to `a`, none to the closer or to this process
      # about its own listener (each would have been sent before the ones awaited above).
      refute_received {:got, ^a, _}
      refute_received {:got, ^closer, _}
      refute_received {:quic, :listener_stopped, ^l}
    end

    test "new_conn goes to the caller of async_accept, which becomes the owner" do
      {l, port} = listen!()
      parent = self()

      acceptor =
        spawn_link(fn ->
          :ok = MaculaQuic.async_accept(l)

          receive do
            {:quic, :new_conn, c, _} ->
              :ok = MaculaQuic.async_accept_stream(c)
              send(parent, {:accepted, c})
              receive do: ({:quic, :new_stream, s, _} -> send(parent, {:stream, s}))
              receive do: (:never -> :ok)
          end
        end)

      {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
      assert_receive {:accepted, sc}, 5_000
      refute_received {:quic, :new_conn, _, _}
      assert MaculaQuic.Native.handle_owner(sc) == acceptor
      {:ok, s} = MaculaQuic.open_stream(c)
      :ok = MaculaQuic.send(s, "x")
      assert_receive {:stream, _}, 5_000
    end
  end

  # The server connections (among `scs`, owned by this process) that the client connections
  # `cs` reach, found by a stream each client opens: one per client, in no particular order.
  defp server_sides(cs, scs) do
    for sc <- scs, do: :ok = MaculaQuic.async_accept_stream(sc)

    for c <- cs do
      {:ok, s} = MaculaQuic.open_stream(c)
      :ok = MaculaQuic.send(s, "which?")
    end

    for _ <- cs do
      receive do
        {:quic, :new_stream, _ss, %{conn: sc}} -> sc
      after
        5_000 -> flunk("no new_stream")
      end
    end
  end

  describe "connect/4" do
    test "IPv4, IPv6, charlist, tuple and DNS name hosts" do
      {l4, p4} = listen!("127.0.0.1")
      {l6, p6} = listen!("::1")

      for {host, port, l} <- [
            {"127.0.0.1", p4, l4},
            {~c"127.0.0.1", p4, l4},
            {{127, 0, 0, 1}, p4, l4},
            {"::1", p6, l6},
            {{0, 0, 0, 0, 0, 0, 0, 1}, p6, l6}
          ] do
        :ok = MaculaQuic.async_accept(l)

        assert {:ok, c} = MaculaQuic.connect(host, port, [alpn: alpn()], 5_000),
               inspect({host, port, MaculaQuic.sockname(l)})

        assert_receive {:quic, :new_conn, _, _}, 5_000
        {:ok, {peer_ip, ^port}} = MaculaQuic.peername(c)
        assert peer_ip in ["127.0.0.1", "::1"]
        {:ok, {local_ip, local_port}} = MaculaQuic.sockname(c)
        assert local_ip == peer_ip and local_port > 0
        :ok = MaculaQuic.close_connection(c)
      end
    end

    test "a DNS name resolves (\"localhost\" may be 127.0.0.1 or ::1: listen on both)" do
      {l4, port} = listen!("127.0.0.1")
      {:ok, l6} = MaculaQuic.listen("::1", port, alpn: alpn())
      :ok = MaculaQuic.async_accept(l4)
      :ok = MaculaQuic.async_accept(l6)
      assert {:ok, c} = MaculaQuic.connect("localhost", port, [alpn: alpn()], 5_000)
      assert_receive {:quic, :new_conn, _, _}, 5_000
      {:ok, {ip, ^port}} = MaculaQuic.peername(c)
      assert ip in ["127.0.0.1", "::1"]
      :ok = MaculaQuic.close_connection(c)
    end

    test "the timeout is enforced" do
      # A bound UDP socket that never answers: the handshake cannot complete.
      {:ok, silent} = :gen_udp.open(0, ip: {127, 0, 0, 1})
      {:ok, port} = :inet.port(silent)

      {us, result} =
        :timer.tc(fn -> MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 300) end)

      assert result == {:error, :timeout}
      assert us < 2_000_000
    end

    test "argument errors" do
      assert {:error, :bad_address} = MaculaQuic.connect("127.0.0.1", 0, [alpn: alpn()], 1_000)
      assert {:error, :bad_address} = MaculaQuic.connect("bad host!", 443, [alpn: alpn()], 1_000)
      assert {:error, {:missing_option, :alpn}} = MaculaQuic.connect("127.0.0.1", 443, [], 1_000)

      assert {:error, {:bad_option, :verify}} =
               MaculaQuic.connect("127.0.0.1", 443, [alpn: alpn(), verify: :maybe], 1_000)

      assert {:error, {:bad_option, :cacertfile}} =
               MaculaQuic.connect("127.0.0.1", 443, [alpn: alpn(), verify: :verify_peer], 1_000)
    end

    test "ALPN mismatch is refused" do
      {_l, port} = listen!()

      assert {:error, {:tls_alert, :no_application_protocol}} =
               MaculaQuic.connect("127.0.0.1", port, [alpn: ["other"]], 5_000)
    end
  end

  describe "TLS verification" do
    test "the client verifies the server against a CA, by name and by IP", %{certs: certs} do
      {l, port} = listen!("127.0.0.1", certfile: certs.cert, keyfile: certs.key)
      :ok = MaculaQuic.async_accept(l)
      opts = [alpn: alpn(), verify: :verify_peer, cacertfile: certs.ca]

      assert {:ok, c} =
               MaculaQuic.connect("127.0.0.1", port, [server_name: "localhost"] ++ opts, 5_000)

      :ok = MaculaQuic.close_connection(c)
      assert {:ok, c} = MaculaQuic.connect("127.0.0.1", port, opts, 5_000)
      :ok = MaculaQuic.close_connection(c)
    end

    test "a server signed by another CA, or for another name, is rejected", %{certs: certs} do
      {_l, port} = listen!("127.0.0.1", certfile: certs.cert, keyfile: certs.key)

      assert {:error, {:tls_alert, :unknown_ca}} =
               MaculaQuic.connect(
                 "127.0.0.1",
                 port,
                 [alpn: alpn(), cacertfile: certs.other_ca],
                 5_000
               )

      assert {:error, {:tls_alert, reason}} =
               MaculaQuic.connect(
                 "127.0.0.1",
                 port,
                 [alpn: alpn(), cacertfile: certs.ca, server_name: "example.com"],
                 5_000
               )

      assert reason in [:bad_certificate, :certificate_unknown]
    end

    test "mutual TLS: a listener with verify_peer requires a client certificate from its CA", %{
      certs: certs
    } do
      {l, port} =
        listen!("127.0.0.1",
          certfile: certs.cert,
          keyfile: certs.key,
          verify: :verify_peer,
          cacertfile: certs.client_ca
        )

      base = [alpn: alpn(), cacertfile: certs.ca, server_name: "localhost"]

      :ok = MaculaQuic.async_accept(l)

      assert {:ok, c} =
               MaculaQuic.connect(
                 "127.0.0.1",
                 port,
                 base ++ [certfile: certs.client_cert, keyfile: certs.client_key],
                 5_000
               )

      assert_receive {:quic, :new_conn, _, _}, 5_000
      :ok = MaculaQuic.close_connection(c)
      # Waiting for the next connection: a refused one must not be delivered.
      :ok = MaculaQuic.async_accept(l)

      # Without a certificate, or with one from another CA, the server refuses: in TLS 1.3 the
      # client may finish its side of the handshake first, so the refusal shows either as the
      # connect result or as the connection ending at once.
      for extra <- [[], [certfile: certs.other_cert, keyfile: certs.other_key]] do
        case MaculaQuic.connect("127.0.0.1", port, base ++ extra, 5_000) do
          {:error, {:tls_alert, _}} ->
            :ok

          {:ok, c} ->
            assert_receive {:quic, :transport_shutdown, ^c, %{status: :tls_error}}, 5_000
            assert_receive {:quic, :closed, ^c, _}, 5_000
        end
      end

      # The accept is still waiting, and gets the next good client.
      refute_received {:quic, :new_conn, _, _}
      good = [certfile: certs.client_cert, keyfile: certs.client_key]
      assert {:ok, c2} = MaculaQuic.connect("127.0.0.1", port, base ++ good, 5_000)
      assert_receive {:quic, :new_conn, sc2, _}, 5_000
      same_connection!(c2, sc2)
      :ok = MaculaQuic.close_connection(c2)
    end
  end

  describe "negotiated_protocol/1 and peercert/1" do
    test "the protocol the server chose, on both ends, through a stream, after the close" do
      # The server picks the first of its own list that the client offers.
      {c, sc, _l, _} = pair!(listen: [alpn: ["b", "test"]], connect: [alpn: ["a", "test", "b"]])
      assert MaculaQuic.negotiated_protocol(c) == {:ok, "b"}
      assert MaculaQuic.negotiated_protocol(sc) == {:ok, "b"}
      {s, ss} = stream_pair!(c, sc)
      assert MaculaQuic.negotiated_protocol(s) == {:ok, "b"}
      assert MaculaQuic.negotiated_protocol(ss) == {:ok, "b"}

      :ok = MaculaQuic.close_connection(c)
      assert MaculaQuic.negotiated_protocol(c) == {:ok, "b"}

      {c2, _sc2, _l2, _} = pair!(connect: [alpn: ["a", "test"]])
      assert MaculaQuic.negotiated_protocol(c2) == {:ok, "test"}
      :ok = MaculaQuic.close_connection(c2)
    end

    test "a client has the server's certificate; a listener the client's only with mutual TLS",
         %{certs: certs} do
      {c, sc, _l, _} = pair!(listen: [certfile: certs.cert, keyfile: certs.key])
      # verify: :none: nobody checked it, but it is there.
      assert MaculaQuic.peercert(c) == {:ok, certs.cert_der}
      {s, _ss} = stream_pair!(c, sc)
      assert MaculaQuic.peercert(s) == {:ok, certs.cert_der}
      assert MaculaQuic.peercert(sc) == {:error, :no_peercert}
      :ok = MaculaQuic.close_connection(c)
      assert MaculaQuic.peercert(c) == {:ok, certs.cert_der}

      [{:Certificate, client_der, _}] = :public_key.pem_decode(File.read!(certs.client_cert))

      {c, sc, _l, _} =
        pair!(
          listen: [
            certfile: certs.cert,
            keyfile: certs.key,
            verify: :verify_peer,
            cacertfile: certs.client_ca
          ],
          connect: [certfile: certs.client_cert, keyfile: certs.client_key]
        )

      assert MaculaQuic.peercert(sc) == {:ok, client_der}
      assert MaculaQuic.peercert(c) == {:ok, certs.cert_der}
      # What a mutual-TLS listener decodes to know who connected.
      assert {:OTPCertificate, _, _, _} = :public_key.pkix_decode_cert(client_der, :otp)
      :ok = MaculaQuic.close_connection(c)
    end

    test "anything but a connection or a stream is an ArgumentError" do
      {l, _port} = listen!()

      for bad <- [l, :conn, make_ref(), "x"] do
        assert_raise ArgumentError, fn -> MaculaQuic.negotiated_protocol(bad) end
        assert_raise ArgumentError, fn -> MaculaQuic.peercert(bad) end
      end

      :ok = MaculaQuic.close_listener(l)
    end
  end

  describe "get_stream_id/1" do
    test "QUIC's stream IDs, the same at both ends: who opened it, which kind, how many before" do
      {c, sc, _l, _} = pair!()
      {s0, ss0} = stream_pair!(c, sc)
      {s4, ss4} = stream_pair!(c, sc)
      {u2, su2} = stream_pair!(c, sc, client: [unidirectional: true])
      {s1, ss1} = stream_pair!(sc, c)

      for {a, b, id} <- [{s0, ss0, 0}, {s4, ss4, 4}, {u2, su2, 2}, {s1, ss1, 1}] do
        assert MaculaQuic.get_stream_id(a) == {:ok, id}
        assert MaculaQuic.get_stream_id(b) == {:ok, id}
      end

      :ok = MaculaQuic.close_stream(s4)
      assert MaculaQuic.get_stream_id(s4) == {:ok, 4}

      for bad <- [c, :stream, make_ref()] do
        assert_raise ArgumentError, fn -> MaculaQuic.get_stream_id(bad) end
      end

      :ok = MaculaQuic.close_connection(c)
    end
  end

  describe "streams" do
    test "data, FIN flag, peer_send_shutdown and stream_closed" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc)
      assert collect!(ss, 5) == "hello"
      :ok = MaculaQuic.send(s, "more", 4)
      # The FIN flag is set when the FIN arrived with the data; Quinn may also send the data a
      # moment before the FIN is queued (see the moduledoc). peer_send_shutdown follows either way.
      assert_receive {:quic, "more", ^ss, flags} when flags in [0, 2], 5_000
      assert_receive {:quic, :peer_send_shutdown, ^ss, :undefined}, 5_000
      :ok = MaculaQuic.send(ss, "bye")
      :ok = MaculaQuic.async_shutdown_stream(ss, MaculaQuic.stream_shutdown_graceful(), 0)
      assert collect!(s, 3) == "bye"
      assert_receive {:quic, :peer_send_shutdown, ^s, :undefined}, 5_000
      assert_receive {:quic, :stream_closed, ^s, %{is_conn_shutdown: false}}, 5_000
      assert_receive {:quic, :stream_closed, ^ss, %{is_closed_remotely: true}}, 5_000
    end

    test "async_send keeps order with send" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, first: "0")
      for i <- 1..200, do: :ok = MaculaQuic.async_send(s, "#{rem(i, 10)}")
      :ok = MaculaQuic.send(s, "end")
      expected = "0" <> Enum.map_join(1..200, &"#{rem(&1, 10)}") <> "end"
      assert collect!(ss, byte_size(expected)) == expected
    end

    test "unidirectional streams" do
      {c, sc, _l, _} = pair!()
      :ok = MaculaQuic.async_accept_stream(sc)
      {:ok, u} = MaculaQuic.open_stream(c, unidirectional: true)
      :ok = MaculaQuic.send(u, "one way", 4)
      assert_receive {:quic, :new_stream, us, %{flags: 1, conn: ^sc, is_orphan: false}}, 5_000
      assert_receive {:quic, "one way", ^us, flags} when flags in [0, 2], 5_000
      assert_receive {:quic, :peer_send_shutdown, ^us, :undefined}, 5_000
      assert {:error, :einval} = MaculaQuic.send(us, "back")
    end

    test "accept_stream/3 times out, then still gets the next stream" do
      {c, sc, _l, _} = pair!()
      assert {:error, :timeout} = MaculaQuic.accept_stream(sc, [], 50)
      {:ok, s} = MaculaQuic.open_stream(c)
      :ok = MaculaQuic.send(s, "late")
      assert {:ok, ss} = MaculaQuic.accept_stream(sc, [active: false], 5_000)
      assert {:ok, "late"} = MaculaQuic.recv(ss, 4, 5_000)
    end

    test "accept_stream/3 on a closed connection" do
      {c, sc, _l, _} = pair!()
      :ok = MaculaQuic.close_connection(c)
      assert_receive {:quic, :closed, ^sc, _}, 5_000
      # Why it ended: the peer closed it with code 0.
      assert {:error, {:shutdown, 0}} = MaculaQuic.accept_stream(sc, [], 5_000)
    end

    test "abort codes reach the peer in both directions" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc)
      _ = collect!(ss, 5)
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_abort_send(), 77)
      assert_receive {:quic, :peer_send_aborted, ^ss, 77}, 5_000

      {s2, ss2} = stream_pair!(c, sc)
      _ = collect!(ss2, 5)
      :ok = MaculaQuic.async_shutdown_stream(ss2, MaculaQuic.stream_shutdown_abort_receive(), 88)
      assert_receive {:quic, :peer_receive_aborted, ^s2, 88}, 5_000
      assert {:error, {:peer_receive_aborted, 88}} = MaculaQuic.send(s2, "refused")

      assert {:error, :badarg} = MaculaQuic.async_shutdown_stream(s2, 0, 0)
      assert {:error, :badarg} = MaculaQuic.async_shutdown_stream(s2, 8, 0)
      assert {:error, :badarg} = MaculaQuic.async_shutdown_stream(s2, 3, 0)
    end

    test "1 MiB echo, byte-exact" do
      {c, sc, _l, _} = pair!()
      payload = :crypto.strong_rand_bytes(1_048_576)
      {s, ss} = stream_pair!(c, sc, first: binary_part(payload, 0, 1))
      echo = spawn_echo(ss)
      :ok = MaculaQuic.handoff_stream(ss, echo)
      :ok = MaculaQuic.send(s, binary_part(payload, 1, byte_size(payload) - 1), 4)
      assert collect!(s, byte_size(payload)) == payload
    end

    # Sends that Quinn takes within the NIF call, sends queued behind flow control, copied small
    # binaries and uncopied large (sub-)binaries must all arrive in order; so must what a passive
    # recv reads from Quinn itself and what the reader task read ahead.
    test "mixed sends and passive recv of every length keep the bytes in order" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, first: "0", server: [active: false])
      payload = :crypto.strong_rand_bytes(3_000_000)
      sizes = Stream.cycle([1, 100, 16_384, 70_000, 5, 300_000, 20_000, 1_000_000])

      spawn_link(fn ->
        Enum.reduce_while(sizes, 0, fn size, at ->
          n = min(size, byte_size(payload) - at)
          piece = binary_part(payload, at, n)

          :ok =
            if rem(at, 3) == 0,
              do: MaculaQuic.async_send(s, piece),
              else: MaculaQuic.send(s, piece)

          if at + n == byte_size(payload), do: {:halt, :ok}, else: {:cont, at + n}
        end)

        :ok = MaculaQuic.send(s, "", 4)
        receive(do: (:never -> :ok))
      end)

      lengths = Stream.cycle([0, 1, 7, 65_536, 0, 100_000, 3])

      {got, _short} =
        Enum.reduce_while(lengths, {[], false}, fn len, {acc, short} ->
          case MaculaQuic.recv(ss, len, 10_000) do
            {:ok, data} ->
              # Length 0 returns what is buffered: never empty, at most the 512 KiB read-ahead.
              # Otherwise exactly `len` bytes; only the last piece before the FIN may be short.
              refute short, "a short piece came before the end of the stream"

              if len == 0,
                do: assert(byte_size(data) in 1..524_288),
                else: assert(byte_size(data) <= len)

              {:cont, {[data | acc], len > 0 and byte_size(data) < len}}

            {:error, :peer_send_shutdown} ->
              {:halt, {acc, short}}
          end
        end)

      got =
        got
        |> Enum.reverse()
        |> IO.iodata_to_binary()

      assert got == "0" <> payload
    end

    @tag timeout: 120_000
    test "100 MiB echo, byte-exact" do
      {c, sc, _l, _} = pair!()
      chunk = :crypto.strong_rand_bytes(1_048_576)
      {s, ss} = stream_pair!(c, sc, first: "x")
      echo = spawn_echo(ss)
      :ok = MaculaQuic.handoff_stream(ss, echo)
      parent = self()

      spawn_link(fn ->
        for _ <- 1..100, do: :ok = MaculaQuic.send(s, chunk)
        :ok = MaculaQuic.send(s, "", 4)
        send(parent, :sent)
      end)

      expected_hash = :crypto.hash_init(:sha256) |> :crypto.hash_update("x")

      expected_hash =
        Enum.reduce(1..100, expected_hash, fn _, h -> :crypto.hash_update(h, chunk) end)

      assert {:ok, digest, n} = sha256_to_fin(s, 10_000)
      assert n == 100 * 1_048_576 + 1
      assert digest == :crypto.hash_final(expected_hash)
      assert_receive :sent, 5_000
    end
  end

  describe "connections" do
    test "shutdown with an error code is seen by the peer; both owners get closed" do
      {c, sc, _l, _} = pair!()
      :ok = MaculaQuic.async_shutdown_connection(c, MaculaQuic.connection_shutdown_none(), 4242)
      assert_receive {:quic, :shutdown, ^sc, 4242}, 5_000
      assert_receive {:quic, :closed, ^sc, %{is_app_closing: false}}, 5_000
      assert_receive {:quic, :closed, ^c, %{is_app_closing: true}}, 5_000
    end

    test "close_connection/1 consumes its own closed message" do
      {c, sc, _l, _} = pair!()
      :ok = MaculaQuic.close_connection(c)
      assert_receive {:quic, :shutdown, ^sc, 0}, 5_000
      # Checked once the peer heard of it: a `closed` left over would have come by then.
      refute_received {:quic, :closed, ^c, _}
      assert :ok = MaculaQuic.close_connection(c)
      assert {:error, _} = MaculaQuic.open_stream(c)
    end

    test "close_connection/3: the peer sees the error code; the closing owner's closed is consumed" do
      {c, sc, _l, _} = pair!()
      :ok = MaculaQuic.close_connection(c, MaculaQuic.connection_shutdown_none(), 4242)
      assert_receive {:quic, :shutdown, ^sc, 4242}, 5_000
      # Checked once the peer heard of it: a `closed` left over would have come by then.
      refute_received {:quic, :closed, ^c, _}
      assert_receive {:quic, :closed, ^sc, %{is_app_closing: false}}, 5_000
      assert :ok = MaculaQuic.close_connection(c, 0, 1)
      assert {:error, _} = MaculaQuic.open_stream(c)

      # SILENT is accepted; Quinn tells the peer all the same.
      {c, sc, _l, _} = pair!()
      :ok = MaculaQuic.close_connection(c, MaculaQuic.connection_shutdown_silent(), 7)
      assert_receive {:quic, :shutdown, ^sc, 7}, 5_000

      {c, _sc, _l, _} = pair!()

      for {flags, code} <- [
            {2, 0},
            {-1, 0},
            {0, -1},
            {0, Bitwise.bsl(1, 62)},
            {:none, 0},
            {0, "1"}
          ] do
        assert MaculaQuic.close_connection(c, flags, code) == {:error, :badarg}
      end

      assert {:ok, _} = MaculaQuic.open_stream(c)
      assert_raise ArgumentError, fn -> MaculaQuic.close_connection(:conn, 0, 0) end
      :ok = MaculaQuic.close_connection(c)
    end

    test "idle timeout is reported as transport_shutdown connection_idle" do
      {c, _sc, _l, _} = pair!(listen: [idle_timeout_ms: 200], connect: [idle_timeout_ms: 200])
      assert_receive {:quic, :transport_shutdown, ^c, %{status: :connection_idle}}, 5_000
      assert_receive {:quic, :closed, ^c, _}, 5_000
    end

    # The queries read Quinn's state on the runtime (the NIF only hands them over): they must
    # answer, correctly and in order, while a transfer keeps Quinn's driver busy.
    test "getstat, peername and sockname answer during a transfer, through both handles" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, first: "x")
      chunk = :binary.copy("t", 1_048_576)
      sender = Task.async(fn -> for(_ <- 1..32, do: :ok = MaculaQuic.send(s, chunk)) end)
      {:ok, [send_oct: first]} = MaculaQuic.getstat(c, [:send_oct])

      sent =
        for _ <- 1..50 do
          assert {:ok, [send_oct: n, rtt_us: rtt]} = MaculaQuic.getstat(s, [:send_oct, :rtt_us])
          assert rtt > 0
          assert {:ok, {"127.0.0.1", port}} = MaculaQuic.peername(c)
          assert {:ok, {"127.0.0.1", ^port}} = MaculaQuic.sockname(sc)
          assert {:ok, {"127.0.0.1", _}} = MaculaQuic.peername(ss)
          n
        end

      assert sent == Enum.sort(sent) and List.first(sent) >= first
      assert collect!(ss, 1 + 32 * 1_048_576) |> byte_size() == 1 + 32 * 1_048_576
      Task.await(sender, 30_000)
      {:ok, [send_oct: last]} = MaculaQuic.getstat(c, [:send_oct])
      assert last > 32 * 1_048_576 and last >= List.last(sent)
      assert :ok = MaculaQuic.handshake(sc)
      # An unknown query is refused by the native side itself.
      assert {:error, :badarg} = MaculaQuic.Native.conn_query(c, :nope, make_ref())
    end

    test "getstat reports real counters that grow with traffic" do
      {c, sc, _l, _} = pair!()

      {:ok, before} =
        MaculaQuic.getstat(c, [:send_oct, :send_cnt, :recv_oct, :recv_cnt, :send_pend])

      assert before[:send_oct] > 0 and before[:recv_cnt] > 0
      {s, ss} = stream_pair!(c, sc)
      :ok = MaculaQuic.send(s, :binary.copy("z", 200_000))
      _ = collect!(ss, 200_005)
      {:ok, later} = MaculaQuic.getstat(c, [:send_oct, :send_cnt, :recv_oct, :recv_cnt])
      assert later[:send_oct] >= before[:send_oct] + 200_000
      assert later[:send_cnt] > before[:send_cnt]
      assert later[:recv_cnt] > before[:recv_cnt]
      assert {:ok, [rtt_us: rtt]} = MaculaQuic.getstat(s, [:rtt_us])
      assert rtt > 0
      assert {:error, {:bad_stat, :nope}} = MaculaQuic.getstat(c, [:send_oct, :nope])
    end

    test "send_pend counts bytes waiting for the peer's flow-control credit" do
      # The listener grants 64 KiB per stream; its side reads nothing until told to, except
      # what its passive reader reads ahead (set to 256 KiB here: the default, 512 KiB, would
      # take the whole 500 KB send below and leave nothing waiting).
      {c, sc, _l, _} = pair!(listen: [stream_recv_window: 65_536])
      {s, ss} = stream_pair!(c, sc, server: [active: false, read_ahead: 262_144])
      assert {:ok, "hello"} = MaculaQuic.recv(ss, 5, 5_000)
      assert {:ok, [send_pend: 0]} = MaculaQuic.getstat(c, [:send_pend])

      :ok = MaculaQuic.async_send(s, :binary.copy("p", 1_048_576))
      {:ok, [send_pend: pend]} = MaculaQuic.getstat(s, [:send_pend])
      # All but what flow control let through waits in our queue: the 64 KiB window, plus
      # what the passive reader may have read ahead (256 KiB), with slack.
      assert pend >= 1_048_576 - 6 * 65_536 and pend <= 1_048_576

      # Reading drains it; it returns to 0 once Quinn has taken everything.
      assert {:ok, data} = MaculaQuic.recv(ss, 1_048_576, 10_000)
      assert byte_size(data) == 1_048_576
      assert {:ok, [send_pend: 0]} = MaculaQuic.getstat(c, [:send_pend])

      # A reset drops what was queued, and the count with it.
      :ok = MaculaQuic.async_send(s, :binary.copy("q", 500_000))
      {:ok, [send_pend: queued]} = MaculaQuic.getstat(c, [:send_pend])
      assert queued >= 500_000 - 6 * 65_536
      :ok = MaculaQuic.setopt(ss, :active, true)
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_abort_send(), 1)
      assert_receive {:quic, :peer_send_aborted, ^ss, 1}, 5_000
      assert {:ok, [send_pend: 0]} = MaculaQuic.getstat(c, [:send_pend])
    end
  end

  describe "shutdown_stream/1,2,4 and shutdown_connection/1,2,3,4 (quicer's blocking shutdowns)" do
    test "a graceful shutdown_stream waits for the peer's side too, and consumes stream_closed" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc)
      assert collect!(ss, 5) == "hello"

      # The peer has not finished its side: the wait runs out, and the shutdown stands.
      assert {:error, :timeout} = MaculaQuic.shutdown_stream(s, 100)
      assert_receive {:quic, :peer_send_shutdown, ^ss, :undefined}, 5_000
      :ok = MaculaQuic.async_shutdown_stream(ss, MaculaQuic.stream_shutdown_graceful(), 0)
      assert_receive {:quic, :stream_closed, ^s, %{is_closed_remotely: true}}, 5_000

      # A peer process that finishes its side once ours has: shutdown_stream returns then.
      {s2, ss2} = stream_pair!(c, sc)
      assert collect!(ss2, 5) == "hello"
      test = self()

      peer =
        spawn_link(fn ->
          receive do
            {:quic, :peer_send_shutdown, ^ss2, :undefined} ->
              :ok =
                MaculaQuic.async_shutdown_stream(ss2, MaculaQuic.stream_shutdown_graceful(), 0)

              send(test, :peer_finished)
          end
        end)

      :ok = MaculaQuic.controlling_process(ss2, peer)
      assert :ok = MaculaQuic.shutdown_stream(s2, 5_000)
      assert_receive :peer_finished, 5_000
      refute_received {:quic, :stream_closed, ^s2, _}
      # Its sending side has ended: a second graceful shutdown is refused at once.
      assert {:error, :closed} = MaculaQuic.shutdown_stream(s2, 5_000)
      assert {:error, :closed} = :macula_quic.shutdown_stream(s2)
    end

    test "shutdown_stream/4 aborts, returns once the stream has ended, and checks its arguments" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc)
      _ = collect!(ss, 5)
      assert :ok = MaculaQuic.shutdown_stream(s, MaculaQuic.stream_shutdown_abort(), 7, 5_000)
      refute_received {:quic, :stream_closed, ^s, _}
      assert_receive {:quic, :peer_send_aborted, ^ss, 7}, 5_000
      assert_receive {:quic, :peer_receive_aborted, ^ss, 7}, 5_000
      # Ended already: no wait (a wait for a second stream_closed would time out).
      assert :ok = MaculaQuic.shutdown_stream(s, MaculaQuic.stream_shutdown_abort(), 7, 1_000)
      assert :ok = :macula_quic.shutdown_stream(s, MaculaQuic.stream_shutdown_abort(), 7, 1_000)

      # After close_stream/1 the owner hears nothing more: no wait either.
      {s2, ss2} = stream_pair!(c, sc)
      _ = collect!(ss2, 5)
      :ok = MaculaQuic.close_stream(s2)
      assert :ok = MaculaQuic.shutdown_stream(s2, MaculaQuic.stream_shutdown_abort(), 1, 1_000)

      # A caller that is not the owner does not wait, and the owner still gets stream_closed.
      {s3, ss3} = stream_pair!(c, sc)
      _ = collect!(ss3, 5)
      test = self()

      spawn_link(fn ->
        send(
          test,
          {:other,
           MaculaQuic.shutdown_stream(s3, MaculaQuic.stream_shutdown_abort(), 3, :infinity)}
        )
      end)

      assert_receive {:other, :ok}, 5_000
      assert_receive {:quic, :stream_closed, ^s3, _}, 5_000
      assert_receive {:quic, :peer_send_aborted, ^ss3, 3}, 5_000

      {s4, _ss4} = stream_pair!(c, sc)

      for {flags, code, timeout} <- [
            {0, 0, 1_000},
            {3, 0, 1_000},
            {2, -1, 1_000},
            {2, Bitwise.bsl(1, 62), 1_000},
            {2, 0, -1},
            {2, 0, :soon},
            {:abort, 0, 1_000}
          ] do
        assert MaculaQuic.shutdown_stream(s4, flags, code, timeout) == {:error, :badarg}
      end

      assert {:error, :badarg} = MaculaQuic.shutdown_stream(s4, 1.5)
      assert_raise ArgumentError, fn -> MaculaQuic.shutdown_stream(c, 2, 0, 1_000) end
      assert_raise ArgumentError, fn -> MaculaQuic.shutdown_stream(:stream, 2, 0, :bad) end
      # Nothing above touched it: it still carries data.
      :ok = MaculaQuic.send(s4, "still open")
    end

    test "shutdown_connection closes, consumes the owner's closed, and checks its arguments" do
      {c, sc, _l, _} = pair!()
      assert :ok = MaculaQuic.shutdown_connection(c)
      assert_receive {:quic, :shutdown, ^sc, 0}, 5_000
      # Checked once the peer heard of it: a `closed` left over would have come by then.
      refute_received {:quic, :closed, ^c, _}
      assert_receive {:quic, :closed, ^sc, _}, 5_000
      # Closed already: `:ok` at once.
      assert :ok = MaculaQuic.shutdown_connection(c, 0)
      assert {:error, _} = MaculaQuic.open_stream(c)

      {c, sc, _l, _} = pair!()
      assert :ok = :macula_quic.shutdown_connection(c, MaculaQuic.connection_shutdown_none(), 42)
      assert_receive {:quic, :shutdown, ^sc, 42}, 5_000
      # Checked once the peer heard of it: a `closed` left over would have come by then.
      refute_received {:quic, :closed, ^c, _}

      {c, sc, _l, _} = pair!()
      assert :ok = MaculaQuic.shutdown_connection(c, 1, 43, 1_000)
      assert_receive {:quic, :shutdown, ^sc, 43}, 5_000

      # A caller that is not the owner does not wait; the owner gets closed.
      {c, sc, _l, _} = pair!()
      test = self()

      spawn_link(fn ->
        send(test, {:other, MaculaQuic.shutdown_connection(c, 0, 44, :infinity)})
      end)

      assert_receive {:other, :ok}, 5_000
      assert_receive {:quic, :closed, ^c, _}, 5_000
      assert_receive {:quic, :shutdown, ^sc, 44}, 5_000

      {c, _sc, _l, _} = pair!()

      for {flags, code, timeout} <- [
            {2, 0, 1_000},
            {0, -1, 1_000},
            {0, Bitwise.bsl(1, 62), 1_000},
            {0, 0, -5},
            {0, 0, "1000"}
          ] do
        assert MaculaQuic.shutdown_connection(c, flags, code, timeout) == {:error, :badarg}
      end

      assert {:error, :badarg} = MaculaQuic.shutdown_connection(c, :later)
      assert {:ok, _} = MaculaQuic.open_stream(c)
      assert_raise ArgumentError, fn -> MaculaQuic.shutdown_connection(:conn) end
      assert_raise ArgumentError, fn -> MaculaQuic.shutdown_connection(:conn, 0, 0, :bad) end
      :ok = MaculaQuic.close_connection(c)
    end
  end

  describe "send/2's back-pressure" do
    test "returns while at most 2 MiB wait for the peer, waits beyond that, and resumes as the peer reads" do
      # The listener grants 64 KiB per stream; its side reads nothing until told to, except
      # what its passive reader reads ahead (256 KiB, set here). So Quinn takes at most
      # ~320 KiB of the 1 MiB pieces below, and the rest waits in our queue.
      {c, sc, _l, _} = pair!(listen: [stream_recv_window: 65_536])
      {s, ss} = stream_pair!(c, sc, server: [active: false, read_ahead: 262_144])
      assert {:ok, "hello"} = MaculaQuic.recv(ss, 5, 5_000)
      piece = :binary.copy("m", 1_048_576)
      parent = self()

      sender =
        spawn_link(fn ->
          for i <- 1..4 do
            :ok = MaculaQuic.send(s, piece)
            send(parent, {:sent, i})
          end
        end)

      # Two pieces fit within 2 MiB: both return without the peer reading anything.
      assert_receive {:sent, 1}, 5_000
      assert_receive {:sent, 2}, 5_000
      # A third would make ~2.7 MiB wait: the sender waits (in its own process).
      wait_until_waiting!(sender)
      refute_receive {:sent, 3}, 200
      {:ok, [send_pend: pend]} = MaculaQuic.getstat(c, [:send_pend])
      assert pend > 2 * 1_048_576 and pend <= 3 * 1_048_576

      # As the peer reads, the queue drains below 2 MiB and the sends return, in order.
      assert {:ok, first} = MaculaQuic.recv(ss, 1_048_576, 10_000)
      assert byte_size(first) == 1_048_576
      assert_receive {:sent, 3}, 10_000
      assert {:ok, _} = MaculaQuic.recv(ss, 1_048_576, 10_000)
      assert_receive {:sent, 4}, 10_000

      # Everything arrives, byte-exact, and nothing is left waiting.
      assert {:ok, rest} = MaculaQuic.recv(ss, 2 * 1_048_576, 10_000)
      assert rest == :binary.copy("m", 2 * 1_048_576)
      assert {:ok, [send_pend: 0]} = MaculaQuic.getstat(c, [:send_pend])
    end

    test "async_send/2 queues all of its data or none: past 16 MiB waiting, :send_queue_full" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, server: [active: false])
      mib = 1_048_576
      piece = :binary.copy("a", mib)
      # The server does not read: Quinn takes what flow control allows, the rest waits.
      sent =
        Enum.reduce_while(1..64, 0, fn _, n ->
          case MaculaQuic.async_send(s, piece) do
            :ok -> {:cont, n + 1}
            {:error, :send_queue_full} -> {:halt, n}
          end
        end)

      # 16 MiB waiting, and up to the windows' worth (~1.5 MiB) that Quinn took.
      assert sent in 16..18
      big = :binary.copy("b", 20 * mib)
      assert {:error, :send_queue_full} = MaculaQuic.async_send(s, big)
      # Nothing of the refused send was queued.
      assert {:ok, got} = MaculaQuic.recv(ss, 5 + sent * mib, 20_000)
      assert got == "hello" <> :binary.copy("a", sent * mib)
      # With nothing waiting, a send of any size is taken whole.
      assert :ok = MaculaQuic.async_send(s, big)
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_graceful(), 0)
      assert {:ok, ^big} = MaculaQuic.recv(ss, 20 * mib, 20_000)
      assert {:error, :peer_send_shutdown} = MaculaQuic.recv(ss, 0, 5_000)
    end

    test "a send with FIN waits for Quinn, so its process may exit right after: nothing is reset" do
      # The peer grants 64 KiB and reads nothing yet, so the 1 MiB below cannot all be taken
      # by Quinn before the peer reads. Were the send answered early, the sender's exit would
      # reset the stream under its data (its owner is gone).
      {c, sc, _l, _} = pair!(listen: [stream_recv_window: 65_536])
      {s, ss} = stream_pair!(c, sc, server: [active: false])
      assert {:ok, "hello"} = MaculaQuic.recv(ss, 5, 5_000)
      data = :crypto.strong_rand_bytes(1_048_576)
      parent = self()

      sender =
        spawn(fn ->
          :ok = MaculaQuic.send(s, data, 4)
          send(parent, :sent)
        end)

      :ok = MaculaQuic.controlling_process(s, sender)
      ref = Process.monitor(sender)
      # Only the peer's reading lets it return.
      assert wait_until(fn -> Process.info(sender, :status) == {:status, :waiting} end)
      refute_received :sent
      assert {:ok, got} = MaculaQuic.recv(ss, 1_048_576, 10_000)
      assert_receive :sent, 10_000
      assert_receive {:DOWN, ^ref, :process, ^sender, :normal}, 5_000

      # The whole of it, then the end of the stream, not a reset.
      assert got == data
      assert {:error, :peer_send_shutdown} = MaculaQuic.recv(ss, 0, 5_000)
    end

    test "a send that returned before the stream failed: the next call says why" do
      {c, sc, _l, _} = pair!(listen: [stream_recv_window: 65_536])
      {s, ss} = stream_pair!(c, sc, server: [active: false])
      assert {:ok, "hello"} = MaculaQuic.recv(ss, 5, 5_000)
      # Returns while most of it still waits for credit the peer never gives.
      assert :ok = MaculaQuic.send(s, :binary.copy("x", 1_048_576))
      {:ok, [send_pend: pend]} = MaculaQuic.getstat(c, [:send_pend])
      assert pend > 0

      # The peer stops reading the stream (STOP_SENDING, code 9): what waited is dropped.
      :ok = MaculaQuic.async_shutdown_stream(ss, MaculaQuic.stream_shutdown_abort_receive(), 9)
      assert_receive {:quic, :peer_receive_aborted, ^s, 9}, 5_000
      assert {:error, {:peer_receive_aborted, 9}} = MaculaQuic.send(s, "more")
      assert {:ok, [send_pend: 0]} = MaculaQuic.getstat(c, [:send_pend])
    end
  end

  describe "ownership" do
    test "only the owner may call controlling_process; the new owner gets the messages" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc)
      _ = collect!(ss, 5)
      parent = self()

      other =
        spawn_link(fn ->
          send(parent, {:not_owner, MaculaQuic.controlling_process(ss, self())})
          receive do: ({:quic, data, ^ss, _} -> send(parent, {:other_got, data}))
          receive do: (:never -> :ok)
        end)

      assert_receive {:not_owner, {:error, :not_owner}}, 5_000
      :ok = MaculaQuic.controlling_process(ss, other)
      assert {:error, :not_owner} = MaculaQuic.controlling_process(ss, self())
      :ok = MaculaQuic.send(s, "for other")
      assert_receive {:other_got, "for other"}, 5_000
      refute_received {:quic, _, ^ss, _}
    end

    test "only the owner hands over a listener, connection or stream; a dead heir changes nothing" do
      {c, sc, l, _} = pair!()
      {s, _ss} = stream_pair!(c, sc)
      parent = self()
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, :process, ^dead, _}, 5_000

      spawn_link(fn ->
        send(
          parent,
          {:tried,
           [
             MaculaQuic.controlling_process(l, self()),
             MaculaQuic.controlling_process(c, self()),
             MaculaQuic.controlling_process(s, self()),
             MaculaQuic.handoff_stream(s, self(), [])
           ]}
        )
      end)

      assert_receive {:tried, tried}, 5_000
      assert tried == List.duplicate({:error, :not_owner}, 4)

      for h <- [l, c, s], do: assert({:error, :closed} = MaculaQuic.controlling_process(h, dead))
      assert {:error, :closed} = MaculaQuic.handoff_stream(s, dead, [])
      # Still ours: only the owner may hand a handle over, and we still can.
      for h <- [l, c, s], do: assert(:ok = MaculaQuic.controlling_process(h, self()))
    end

    test "handoff_stream forwards queued messages in order, nothing lost" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, first: "0")
      for i <- 1..25, do: :ok = MaculaQuic.send(s, "#{rem(i, 10)}")
      wait_until_queued!(ss)
      parent = self()

      worker =
        spawn_link(fn -> receive(do: (:go -> send(parent, {:got, collect_until_fin(ss, [])}))) end)

      # More data keeps arriving while the handoff happens.
      sender =
        Task.async(fn -> for(i <- 26..50, do: :ok = MaculaQuic.send(s, "#{rem(i, 10)}")) end)

      :ok = MaculaQuic.handoff_stream(ss, worker)
      Task.await(sender)
      :ok = MaculaQuic.send(s, "", 4)
      send(worker, :go)
      expected = "0" <> Enum.map_join(1..50, &"#{rem(&1, 10)}")
      assert_receive {:got, ^expected}, 5_000
      refute_received {:quic, _, ^ss, _}
    end

    # handoff_stream pauses delivery, forwards the old owner's queued messages, then restores
    # the mode. A new owner that is already using the stream by then keeps its own choice:
    # restoring over it used to leave the stream passive with data waiting and nobody told
    # (bin/demo stalled about once in eight runs). The steps are driven one by one here.
    test "a new owner that sets a mode before handoff_stream finishes keeps it" do
      parent = self()

      {s, ss, _} =
        paused_handoff!(fn ss ->
          :ok = MaculaQuic.setopt(ss, :active, 16)
          send(parent, :set)
          forward_data(ss, parent)
        end)

      assert_receive :set, 5_000
      # What handoff_stream(ss, new_owner, active: false) does last.
      :ok = MaculaQuic.Native.stream_handoff_resume(ss, false)
      assert_receive {:got, "a"}, 5_000
      :ok = MaculaQuic.send(s, "b")
      assert_receive {:got, "b"}, 5_000
    end

    test "a new owner that reads before handoff_stream finishes stays passive" do
      parent = self()

      {s, ss, new_owner} =
        paused_handoff!(fn ss ->
          send(parent, {:first, MaculaQuic.recv(ss, 1, 5_000)})
          receive do: (:again -> :ok)
          send(parent, {:second, MaculaQuic.recv(ss, 1, 5_000)})
        end)

      assert_receive {:first, {:ok, "a"}}, 5_000
      # handoff_stream(ss, new_owner, active: true) would now turn delivery on, failing the
      # reader's next recv with :einval.
      :ok = MaculaQuic.Native.stream_handoff_resume(ss, true)
      :ok = MaculaQuic.send(s, "b")
      send(new_owner, :again)
      assert_receive {:second, {:ok, "b"}}, 5_000
    end

    # Messages no mode holds back (stream_closed, peer_receive_aborted, send_shutdown_complete)
    # wait for the pause's end too, so they follow what the old owner forwards, and stream_closed stays the last.
    test "stream_closed and peer_receive_aborted wait for the end of a handoff's pause" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, server: [active: true], first: "a")
      :ok = MaculaQuic.send(s, "", 4)
      assert_receive {:quic, "a", ^ss, _}, 5_000
      assert_receive {:quic, :peer_send_shutdown, ^ss, _}, 5_000
      parent = self()

      new_owner =
        spawn_link(fn ->
          report = fn ->
            receive do
              :report ->
                {:messages, msgs} = Process.info(self(), :messages)
                send(parent, {:seen, for({:quic, tag, ^ss, _} <- msgs, do: tag)})
            end
          end

          report.()
          report.()
        end)

      assert {:ok, true} = MaculaQuic.Native.stream_handoff(ss, new_owner)
      # The peer stops reading: the server's sending side ends, and with it the stream.
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_abort_receive(), 7)
      assert wait_until(fn -> MaculaQuic.Native.stream_info(ss).closed end)
      # As a `refute_receive` would: time for a message that should be held, but was sent as
      # the stream closed, to reach the new owner before it looks.
      receive(after: (100 -> :ok))
      send(new_owner, :report)
      assert_receive {:seen, []}, 5_000

      :ok = MaculaQuic.Native.stream_handoff_resume(ss, true)
      send(new_owner, :report)

      assert_receive {:seen, [:peer_receive_aborted, :send_shutdown_complete, :stream_closed]},
                     5_000

      refute_received {:quic, _, ^ss, _}
      MaculaQuic.close(c)
    end

    test "an old owner that exits in the middle of a handoff: wait_for_handoff restores delivery" do
      {c, sc, _l, _} = pair!()
      {s, ss} = stream_pair!(c, sc, server: [active: true], first: "a")
      assert_receive {:quic, "a", ^ss, _}, 5_000
      parent = self()

      new_owner =
        spawn_link(fn ->
          receive do
            {:wait, old} ->
              send(parent, {:waited, MaculaQuic.wait_for_handoff(old, ss)})
              send(parent, {:new_owner_got, collect_until_fin(ss, [])})
          end
        end)

      # Hands the stream over as handoff_stream/3 begins to, and exits before it ends.
      old_owner =
        spawn(fn ->
          receive(do: (:go -> {:ok, true} = MaculaQuic.Native.stream_handoff(ss, new_owner)))
        end)

      :ok = MaculaQuic.controlling_process(ss, old_owner)
      send(new_owner, {:wait, old_owner})
      ref = Process.monitor(old_owner)
      send(old_owner, :go)
      assert_receive {:DOWN, ^ref, :process, _, :normal}, 5_000
      assert_receive {:waited, {:error, :owner_down}}, 5_000
      assert {:ok, true} = MaculaQuic.getopt(ss, :active)
      :ok = MaculaQuic.send(s, "b", 4)
      assert_receive {:new_owner_got, "b"}, 5_000
      MaculaQuic.close(c)
    end

    # The other order: a process that sets a mode before the handoff has begun is not yet
    # the owner, and the handoff then applies its own `:active`, as asked. (bin/demo's
    # acceptor once spawned its stream workers this way and stalled about once in 16 runs;
    # they now wait for a word, as the docs say.)
    test "a mode set before handoff_stream begins gives way to the handoff's :active" do
      {c, sc, _l, _} = pair!()
      {_s, ss} = stream_pair!(c, sc, server: [active: false], first: "a")
      new_owner = spawn_link(fn -> receive(do: (:never -> :ok)) end)
      :ok = Task.await(Task.async(fn -> MaculaQuic.setopt(ss, :active, 16) end))
      # 15 once the waiting "a" has been delivered.
      assert {:ok, n} = MaculaQuic.getopt(ss, :active)
      assert n in 15..16
      :ok = MaculaQuic.handoff_stream(ss, new_owner, active: false)
      assert {:ok, false} = MaculaQuic.getopt(ss, :active)
    end

    test "owner death shuts handles down and frees them" do
      {l, port} = listen!()
      parent = self()

      client =
        spawn(fn ->
          {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: alpn()], 5_000)
          {:ok, s} = MaculaQuic.open_stream(c)
          :ok = MaculaQuic.send(s, "hi")
          send(parent, :ready)
          receive do: (:never -> :ok)
        end)

      {:ok, sc} = MaculaQuic.accept(l, [], 5_000)
      {:ok, ss} = MaculaQuic.accept_stream(sc, [], 5_000)
      assert_receive :ready, 5_000
      assert collect!(ss, 2) == "hi"
      Process.exit(client, :kill)
      assert_receive {:quic, :shutdown, ^sc, 0}, 5_000
      assert_receive {:quic, :closed, ^sc, _}, 5_000
    end
  end

  describe "the Erlang module" do
    test ":macula_quic drives the same scenario" do
      {:ok, l} = :macula_quic.listen({~c"127.0.0.1", 0}, [{:alpn, [~c"test"]}])
      {:ok, {_, port}} = :macula_quic.sockname(l)
      :ok = :macula_quic.async_accept(l)

      {:ok, c} =
        :macula_quic.connect(~c"127.0.0.1", port, [{:alpn, [~c"test"]}, {:verify, :none}], 5_000)

      assert_receive {:quic, :new_conn, sc, _}, 5_000
      :ok = :macula_quic.async_accept_stream(sc, [{:active, false}])
      {:ok, s} = :macula_quic.open_stream(c, [{:active, :once}])
      :ok = :macula_quic.send(s, [~c"ab", "cd"])
      assert_receive {:quic, :new_stream, ss, %{is_orphan: false}}, 5_000
      assert {:ok, "abcd"} = :macula_quic.recv(ss, 4, 5_000)
      :ok = :macula_quic.send(ss, "ef", 4)
      # With or without the FIN flag (it is set when the FIN arrived with the data), :once makes
      # the stream passive after this message, and recv then reports the end.
      assert_receive {:quic, "ef", ^s, flags} when flags in [0, 2], 5_000
      assert {:ok, false} = :macula_quic.getopt(s, :active)
      assert {:error, :peer_send_shutdown} = :macula_quic.recv(s, 0, 5_000)
      assert {:ok, [send_cnt: n]} = :macula_quic.getstat(c, [:send_cnt])
      assert n > 0
      :ok = :macula_quic.async_shutdown_stream(s, :macula_quic.stream_shutdown_abort(), 5)
      assert :ok = :macula_quic.close(c)
      assert :ok = :macula_quic.close(l)
    end
  end

  test "a wrong kind of handle raises ArgumentError saying what was expected" do
    {c, _sc, l, _} = pair!()

    assert_raise ArgumentError, ~r/expected a stream handle.*a connection/, fn ->
      MaculaQuic.send(c, "x")
    end

    assert_raise ArgumentError, ~r/expected a connection handle.*a listener/, fn ->
      MaculaQuic.open_stream(l)
    end

    assert_raise ArgumentError, ~r/not a macula_quic handle/, fn ->
      MaculaQuic.close(make_ref())
    end

    assert_raise ArgumentError, ~r/expected iodata/, fn -> MaculaQuic.send(c, :atom) end
  end

  test "a panic in Rust is an Erlang error, not a crash" do
    assert_raise ErlangError, fn -> MaculaQuic.Native.debug_panic() end
    assert MaculaQuic.Native.ping() == :ok
  end

  ## helpers

  # A stream pair (server end passive, "a" waiting in it) whose server end goes to a new
  # process through the first step of handoff_stream only: delivery paused, the mode not yet
  # restored. The new process then runs `fun.(server_stream)`. Returns {client end, server end,
  # new owner}.
  defp paused_handoff!(fun) do
    {c, sc, _l, _} = pair!()
    {s, ss} = stream_pair!(c, sc, server: [active: false], first: "a")
    new_owner = spawn_link(fn -> receive(do: (:go -> fun.(ss))) end)
    assert {:ok, false} = MaculaQuic.Native.stream_handoff(ss, new_owner)
    send(new_owner, :go)
    {s, ss, new_owner}
  end

  # Sends `{:got, data}` to `to` for each data message about `stream`.
  defp forward_data(stream, to) do
    receive do
      {:quic, data, ^stream, _} when is_binary(data) ->
        send(to, {:got, data})
        forward_data(stream, to)
    end
  end

  defp spawn_echo(stream) do
    spawn_link(fn -> echo_loop(stream) end)
  end

  defp echo_loop(stream) do
    receive do
      {:quic, data, ^stream, flags} when is_binary(data) ->
        :ok = MaculaQuic.send(stream, data, if(Bitwise.band(flags, 2) != 0, do: 4, else: 0))
        echo_loop(stream)

      # The FIN may come with the last data (flag 2, echoed above) or on its own, after the
      # last data message was delivered; then finish here (an error if already finished).
      {:quic, :peer_send_shutdown, ^stream, _} ->
        _ = MaculaQuic.async_shutdown_stream(stream, MaculaQuic.stream_shutdown_graceful(), 0)
        echo_loop(stream)

      {:quic, :stream_closed, ^stream, _} ->
        :ok
    end
  end

  defp collect_until_fin(stream, acc) do
    receive do
      {:quic, data, ^stream, flags} when is_binary(data) ->
        if Bitwise.band(flags, 2) != 0,
          do: IO.iodata_to_binary(Enum.reverse([data | acc])),
          else: collect_until_fin(stream, [data | acc])

      {:quic, :peer_send_shutdown, ^stream, _} ->
        IO.iodata_to_binary(Enum.reverse(acc))
    after
      5_000 -> flunk("no FIN")
    end
  end

  # Bounded poll of our own mailbox (5 s): there is no message to wait for that would not
  # consume it.
  defp wait_until_queued!(stream) do
    queued? = fn ->
      {:messages, msgs} = Process.info(self(), :messages)
      Enum.any?(msgs, &match?({:quic, _, ^stream, _}, &1))
    end

    unless wait_until(queued?, 500), do: flunk("nothing queued for the stream")
    :ok
  end
end
