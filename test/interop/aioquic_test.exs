defmodule MaculaQuic.Interop.AioquicTest do
  @moduledoc """
  Interop with aioquic, an independent QUIC stack (Python), installed by bin/setup-interop.

  Both directions: our listener with an aioquic client, and an aioquic server with our client,
  over 127.0.0.1 and ::1. The peer runs test/support/interop/peer.py, driven step by step
  through MaculaQuic.Test.Aioquic; our listener side is MaculaQuic.Test.EchoListener.
  If aioquic cannot be installed, every test here fails (setup_all raises).
  """
  use ExUnit.Case, async: false

  @moduletag :interop
  @moduletag timeout: 60_000

  alias MaculaQuic.Test.Aioquic, as: Py
  alias MaculaQuic.Test.EchoListener, as: Echo

  @alpn "macula-interop"
  @mib 1_048_576
  @streams 4
  @wait 10_000

  setup_all do
    Py.ensure!()

    dir = MaculaQuic.Test.Certs.fresh_dir!("macula_quic_interop")

    certs = Py.certs!(dir)
    on_exit(fn -> File.rm_rf(dir) end)
    %{certs: certs}
  end

  # Our listener (echo), certificate signed by the test CA.
  defp our_listener(ip, certs, extra \\ []) do
    opts = [alpn: ["h3-not-this", @alpn], certfile: certs.cert, keyfile: certs.key]
    Echo.start(ip, Keyword.merge(opts, extra))
  end

  # An aioquic client verifying our listener against the test CA.
  defp aioquic_client(ip, port, certs, extra \\ []) do
    Py.client(
      ip,
      port,
      Keyword.merge(
        [alpn: ["not-this", @alpn], cafile: certs.ca, server_name: "localhost"],
        extra
      )
    )
  end

  defp aioquic_server(ip, certs, extra \\ []) do
    Py.server(
      ip,
      Keyword.merge(
        [alpn: ["not-this", @alpn], cert: certs.cert, key: certs.key, echo: true],
        extra
      )
    )
  end

  # Our client verifying the aioquic server against the test CA.
  defp our_client(ip, port, certs, extra \\ []) do
    opts =
      Keyword.merge(
        [
          alpn: ["h3-not-this", @alpn],
          cacertfile: certs.ca,
          verify: :verify_peer,
          server_name: "localhost"
        ],
        extra
      )

    MaculaQuic.connect(ip, port, opts, 5_000)
  end

  # Data messages on `stream` up to its peer_send_shutdown, which must come as quicer's shape.
  defp collect(stream, acc \\ []) do
    receive do
      {:quic, data, ^stream, flags} when is_binary(data) and is_integer(flags) ->
        collect(stream, [acc, data])

      {:quic, :peer_send_shutdown, ^stream, :undefined} ->
        IO.iodata_to_binary(acc)

      {:quic, :peer_send_aborted, ^stream, code} ->
        flunk("stream reset by the peer (code #{code}) after #{IO.iodata_length(acc)} bytes")
    after
      @wait ->
        flunk("no peer_send_shutdown within #{@wait} ms (#{IO.iodata_length(acc)} bytes so far)")
    end
  end

  defp sha(data), do: Base.encode16(:crypto.hash(:sha256, data), case: :lower)

  defp new_conn do
    assert_receive {:echo, {:quic, :new_conn, conn, info}}, @wait
    {conn, info}
  end

  for {family, ip} <- [ipv4: "127.0.0.1", ipv6: "::1"] do
    describe "our listener, aioquic client over #{family}" do
      @describetag family: family

      test "datagrams both ways: aioquic's are delivered to the owner and echoed", %{
        certs: certs
      } do
        {_pid, _l, port} = our_listener(unquote(ip), certs, datagram_receive_enabled: true)
        py = aioquic_client(unquote(ip), port, certs, datagrams: true)
        Py.await(py, %{"event" => "connected"})
        {conn, _info} = new_conn()

        assert_receive {:echo, {:quic, :dgram_state_changed, ^conn, %{dgram_send_enabled: true}}},
                       @wait

        for i <- 1..3 do
          data = "datagram #{i} from aioquic"
          Py.call(py, %{cmd: "datagram", data: data})
          assert_receive {:echo_datagram, ^conn, ^data}, @wait
          assert %{"data" => ^data} = Py.await(py, %{"event" => "datagram"})
        end
      end

      test "ALPN and #{@streams} bidirectional streams echoing 1 MiB byte-exact", %{certs: certs} do
        {_pid, _l, port} = our_listener(unquote(ip), certs)
        py = aioquic_client(unquote(ip), port, certs)

        assert %{"alpn" => @alpn} = Py.await(py, %{"event" => "connected"})
        {_conn, info} = new_conn()
        assert info.alpns == @alpn
        assert info.server_name == "localhost"
        assert info.remote_addr =~ unquote(ip)

        sent =
          for i <- 1..@streams do
            %{"stream_id" => sid} = Py.call(py, %{cmd: "open"})

            %{"sha256" => hash, "length" => @mib} =
              Py.call(py, %{cmd: "send", stream_id: sid, random: @mib, seed: i, fin: true})

            {sid, hash}
          end

        # aioquic got every stream back, byte for byte, then our FIN.
        for {sid, hash} <- sent do
          assert %{"length" => @mib, "sha256" => ^hash} =
                   Py.await(py, %{"event" => "stream_fin", "stream_id" => sid}, 30_000)
        end

        # We saw each aioquic FIN as peer_send_shutdown, after exactly the bytes it sent.
        received =
          for _ <- 1..@streams do
            assert_receive {:echo, {:quic, :peer_send_shutdown, s, :undefined}}, @wait
            assert_receive {:echo_done, ^s, %{length: @mib, sha256: hash}}, @wait
            hash
          end

        assert Enum.sort(received) == Enum.sort(for {_, h} <- sent, do: h)
      end

      test "unidirectional streams both ways", %{certs: certs} do
        {pid, _l, port} = our_listener(unquote(ip), certs)
        py = aioquic_client(unquote(ip), port, certs)
        Py.await(py, %{"event" => "connected"})
        {conn, _} = new_conn()

        # aioquic -> us: new_stream with flags 1, its bytes, its FIN.
        %{"stream_id" => sid} = Py.call(py, %{cmd: "open", uni: true})
        assert Bitwise.band(sid, 3) == 2
        Py.call(py, %{cmd: "send", stream_id: sid, data: "one-way from aioquic", fin: true})
        assert_receive {:echo, {:quic, :new_stream, s, %{flags: 1, is_orphan: false}}}, @wait
        assert_receive {:echo, {:quic, :peer_send_shutdown, ^s, :undefined}}, @wait
        assert_receive {:echo_done, ^s, %{data: "one-way from aioquic"}}

        # us -> aioquic.
        assert :ok =
                 Echo.run(pid, fn ->
                   {:ok, u} = MaculaQuic.open_stream(conn, unidirectional: true)
                   MaculaQuic.send(u, "one-way from macula_quic", 4)
                 end)

        assert %{"stream_id" => usid} = Py.await(py, %{"event" => "new_stream", "uni" => true})
        assert Bitwise.band(usid, 3) == 3

        assert %{"data" => "one-way from macula_quic"} =
                 Py.await(py, %{"event" => "stream_fin", "stream_id" => usid})
      end

      test "stream reset and STOP_SENDING with application codes, both ways", %{certs: certs} do
        {pid, _l, port} = our_listener(unquote(ip), certs)
        py = aioquic_client(unquote(ip), port, certs)
        Py.await(py, %{"event" => "connected"})
        new_conn()

        # RESET_STREAM: aioquic's code reaches us, ours reaches aioquic.
        %{"stream_id" => sid} = Py.call(py, %{cmd: "open"})
        Py.call(py, %{cmd: "send", stream_id: sid, data: "partial"})
        assert_receive {:echo, {:quic, :new_stream, s, %{flags: 0}}}, @wait
        Py.call(py, %{cmd: "reset", stream_id: sid, code: 0x1234})
        assert_receive {:echo, {:quic, :peer_send_aborted, ^s, 0x1234}}, @wait
        assert :ok = Echo.run(pid, fn -> MaculaQuic.async_shutdown_stream(s, 2, 0x4321) end)

        assert %{"error_code" => 0x4321} =
                 Py.await(py, %{"event" => "stream_reset", "stream_id" => sid})

        # STOP_SENDING, both ways.
        %{"stream_id" => sid2} = Py.call(py, %{cmd: "open"})
        Py.call(py, %{cmd: "send", stream_id: sid2, data: "more"})
        assert_receive {:echo, {:quic, :new_stream, s2, %{flags: 0}}}, @wait
        Py.call(py, %{cmd: "stop", stream_id: sid2, code: 0x77})
        assert_receive {:echo, {:quic, :peer_receive_aborted, ^s2, 0x77}}, @wait
        assert :ok = Echo.run(pid, fn -> MaculaQuic.async_shutdown_stream(s2, 4, 0x66) end)

        assert %{"error_code" => 0x66} =
                 Py.await(py, %{"event" => "stop_sending", "stream_id" => sid2})
      end

      test "connection close with application codes, both ways", %{certs: certs} do
        {pid, _l, port} = our_listener(unquote(ip), certs)

        # We close: aioquic sees an application CONNECTION_CLOSE with our code.
        py = aioquic_client(unquote(ip), port, certs)
        Py.await(py, %{"event" => "connected"})
        {conn, _} = new_conn()
        assert :ok = Echo.run(pid, fn -> MaculaQuic.async_shutdown_connection(conn, 0, 4242) end)

        assert %{"error_code" => 4242, "application" => true, "by_self" => false} =
                 Py.await(py, %{"event" => "terminated"})

        assert_receive {:echo, {:quic, :closed, ^conn, %{}}}, @wait

        # aioquic closes: we see {:quic, :shutdown, conn, code}, then closed.
        py2 = aioquic_client(unquote(ip), port, certs)
        Py.await(py2, %{"event" => "connected"})
        {conn2, _} = new_conn()
        Py.call(py2, %{cmd: "close", code: 777, reason: "bye"})
        assert_receive {:echo, {:quic, :shutdown, ^conn2, 777}}, @wait
        assert_receive {:echo, {:quic, :closed, ^conn2, %{}}}, @wait
        refute_received {:echo, {:quic, :transport_shutdown, ^conn2, _}}
      end
    end

    describe "aioquic server, our client over #{family}" do
      @describetag family: family

      test "datagrams both ways, echoed by aioquic; none to an aioquic that does not accept them",
           %{certs: certs} do
        py = aioquic_server(unquote(ip), certs, datagrams: true)
        on = [datagram_receive_enabled: true]
        assert {:ok, conn} = our_client(unquote(ip), py.listen_port, certs, on)
        Py.await(py, %{"event" => "connected"})

        assert_receive {:quic, :dgram_state_changed, ^conn,
                        %{dgram_send_enabled: true, dgram_max_len: max}},
                       @wait

        assert max >= 1_000
        :ok = MaculaQuic.send_dgram(conn, "datagram from macula_quic")
        assert %{"data" => "datagram from macula_quic"} = Py.await(py, %{"event" => "datagram"})
        # aioquic's echo, and one it sends of its own.
        assert_receive {:quic, "datagram from macula_quic", ^conn, 0}, @wait
        Py.call(py, %{cmd: "datagram", data: "datagram from aioquic"})
        assert_receive {:quic, "datagram from aioquic", ^conn, 0}, @wait
        MaculaQuic.close_connection(conn)

        # An aioquic server without datagrams: we are told, and may not send.
        py = aioquic_server(unquote(ip), certs)
        assert {:ok, conn} = our_client(unquote(ip), py.listen_port, certs, on)

        assert_receive {:quic, :dgram_state_changed, ^conn,
                        %{dgram_send_enabled: false, dgram_max_len: 0}},
                       @wait

        assert {:error, :unsupported_by_peer} = MaculaQuic.send_dgram(conn, "x")
        MaculaQuic.close_connection(conn)
      end

      test "ALPN and #{@streams} bidirectional streams echoing 1 MiB byte-exact", %{certs: certs} do
        py = aioquic_server(unquote(ip), certs)
        assert {:ok, conn} = our_client(unquote(ip), py.listen_port, certs)
        assert %{"alpn" => @alpn} = Py.await(py, %{"event" => "connected"})

        payloads =
          for _ <- 1..@streams do
            {:ok, s} = MaculaQuic.open_stream(conn)
            {s, :crypto.strong_rand_bytes(@mib)}
          end

        for {s, data} <- payloads, do: assert(:ok = MaculaQuic.send(s, data, 4))

        # Our FIN reached aioquic after exactly our bytes ...
        fins =
          for _ <- 1..@streams do
            Py.await(py, %{"event" => "stream_fin"}, 30_000)
          end

        assert Enum.sort(for f <- fins, do: {f["length"], f["sha256"]}) ==
                 Enum.sort(for {_, d} <- payloads, do: {@mib, sha(d)})

        # ... and its echo, then its FIN (peer_send_shutdown), reached us byte-exact.
        for {s, data} <- payloads do
          assert collect(s) == data
        end

        MaculaQuic.close_connection(conn)
      end

      test "unidirectional streams both ways, and aioquic's FIN on a stream it opened", %{
        certs: certs
      } do
        py = aioquic_server(unquote(ip), certs)
        assert {:ok, conn} = our_client(unquote(ip), py.listen_port, certs)
        Py.await(py, %{"event" => "connected"})

        # us -> aioquic.
        {:ok, u} = MaculaQuic.open_stream(conn, unidirectional: true)
        :ok = MaculaQuic.send(u, "one-way from macula_quic", 4)
        assert %{"stream_id" => usid} = Py.await(py, %{"event" => "new_stream", "uni" => true})
        assert Bitwise.band(usid, 3) == 2

        assert %{"data" => "one-way from macula_quic"} =
                 Py.await(py, %{"event" => "stream_fin", "stream_id" => usid})

        # aioquic -> us, unidirectional: new_stream flags 1.
        :ok = MaculaQuic.async_accept_stream(conn)
        %{"stream_id" => sid} = Py.call(py, %{cmd: "open", uni: true})
        assert Bitwise.band(sid, 3) == 3
        Py.call(py, %{cmd: "send", stream_id: sid, data: "one-way from aioquic", fin: true})
        assert_receive {:quic, :new_stream, s, %{flags: 1, is_orphan: false}}, @wait
        assert collect(s) == "one-way from aioquic"

        # aioquic opens a bidirectional stream and finishes it; we answer on it.
        :ok = MaculaQuic.async_accept_stream(conn)
        %{"stream_id" => bsid} = Py.call(py, %{cmd: "open"})
        assert Bitwise.band(bsid, 3) == 1
        Py.call(py, %{cmd: "send", stream_id: bsid, data: "question", fin: true})
        assert_receive {:quic, :new_stream, b, %{flags: 0}}, @wait
        assert collect(b) == "question"
        :ok = MaculaQuic.send(b, "answer", 4)

        assert %{"data" => "answer"} =
                 Py.await(py, %{"event" => "stream_fin", "stream_id" => bsid})

        MaculaQuic.close_connection(conn)
      end

      test "stream reset and STOP_SENDING with application codes, both ways", %{certs: certs} do
        py = aioquic_server(unquote(ip), certs, echo: false)
        assert {:ok, conn} = our_client(unquote(ip), py.listen_port, certs)
        Py.await(py, %{"event" => "connected"})

        # RESET_STREAM.
        {:ok, s} = MaculaQuic.open_stream(conn)
        :ok = MaculaQuic.send(s, "hello")
        %{"stream_id" => sid} = Py.await(py, %{"event" => "new_stream", "uni" => false})
        :ok = MaculaQuic.async_shutdown_stream(s, 2, 0x77)

        assert %{"error_code" => 0x77} =
                 Py.await(py, %{"event" => "stream_reset", "stream_id" => sid})

        Py.call(py, %{cmd: "send", stream_id: sid, data: "before reset"})
        Py.call(py, %{cmd: "reset", stream_id: sid, code: 0x99})
        assert_receive {:quic, :peer_send_aborted, ^s, 0x99}, @wait

        # STOP_SENDING.
        {:ok, s2} = MaculaQuic.open_stream(conn)
        :ok = MaculaQuic.send(s2, "hello again")
        %{"stream_id" => sid2} = Py.await(py, %{"event" => "new_stream", "uni" => false})
        Py.call(py, %{cmd: "stop", stream_id: sid2, code: 0x55})
        assert_receive {:quic, :peer_receive_aborted, ^s2, 0x55}, @wait
        :ok = MaculaQuic.async_shutdown_stream(s2, 4, 0x66)

        assert %{"error_code" => 0x66} =
                 Py.await(py, %{"event" => "stop_sending", "stream_id" => sid2})

        MaculaQuic.close_connection(conn)
      end

      test "connection close with application codes, both ways", %{certs: certs} do
        py = aioquic_server(unquote(ip), certs)

        # We close.
        assert {:ok, c1} = our_client(unquote(ip), py.listen_port, certs)
        %{"conn" => i1} = Py.await(py, %{"event" => "connected"})
        :ok = MaculaQuic.async_shutdown_connection(c1, 0, 31337)

        assert %{"error_code" => 31337, "application" => true, "by_self" => false} =
                 Py.await(py, %{"event" => "terminated", "conn" => i1})

        assert_receive {:quic, :closed, ^c1, %{}}, @wait

        # aioquic closes.
        assert {:ok, c2} = our_client(unquote(ip), py.listen_port, certs)
        %{"conn" => i2} = Py.await(py, %{"event" => "connected"})
        Py.call(py, %{cmd: "close", conn: i2, code: 4711, reason: "bye"})
        assert_receive {:quic, :shutdown, ^c2, 4711}, @wait
        assert_receive {:quic, :closed, ^c2, %{}}, @wait
        refute_received {:quic, :transport_shutdown, ^c2, _}
      end
    end
  end

  describe "message order" do
    # Found by the echo test above: a data message can reach the acceptor before the
    # {:quic, :new_stream, ...} that announces its stream.
    test "new_stream reaches the acceptor before the stream's first data", %{certs: certs} do
      {_pid, _l, port} = our_listener("127.0.0.1", certs)
      py = aioquic_client("127.0.0.1", port, certs)
      Py.await(py, %{"event" => "connected"})
      new_conn()
      n = 40

      for i <- 1..n do
        %{"stream_id" => sid} = Py.call(py, %{cmd: "open"})
        Py.call(py, %{cmd: "send", stream_id: sid, random: 16_384, seed: i, fin: true})
      end

      for _ <- 1..n, do: assert_receive({:echo_done, _, %{length: 16_384}}, @wait)
      refute_received {:echo_data_before_new_stream, _}
    end
  end

  describe "certificates: our client verifies aioquic" do
    test "valid chain, by name and by IP address (v4 and v6)", %{certs: certs} do
      for ip <- ["127.0.0.1", "::1"] do
        py = aioquic_server(ip, certs)
        assert {:ok, c} = our_client(ip, py.listen_port, certs)
        MaculaQuic.close_connection(c)
        # Without server_name the certificate must match the IP address (it has it as a SAN).
        opts = [alpn: [@alpn], cacertfile: certs.ca, verify: :verify_peer]
        assert {:ok, c} = MaculaQuic.connect(ip, py.listen_port, opts, 5_000)
        MaculaQuic.close_connection(c)
      end
    end

    test "a server certificate from another CA fails with a TLS alert", %{certs: certs} do
      py = aioquic_server("127.0.0.1", certs)

      assert {:error, {:tls_alert, _}} =
               our_client("127.0.0.1", py.listen_port, certs, cacertfile: certs.other_ca)
    end

    test "a certificate for another name fails", %{certs: certs} do
      # The server's certificate is for localhost; we ask for wrong.example ...
      py = aioquic_server("127.0.0.1", certs)

      assert {:error, {:tls_alert, _}} =
               our_client("127.0.0.1", py.listen_port, certs, server_name: "wrong.example")

      # ... and a server whose certificate (from our CA) names only wrong.example.
      py2 = aioquic_server("::1", certs, cert: certs.wrong_name_cert, key: certs.wrong_name_key)

      assert {:error, {:tls_alert, _}} = our_client("::1", py2.listen_port, certs)
    end

    test "async_connect/3: connected with the ALPN aioquic chose, then a stream echoes; a refusal is transport_shutdown",
         %{certs: certs} do
      py = aioquic_server("::1", certs)

      opts = [
        alpn: ["h3-not-this", @alpn],
        cacertfile: certs.ca,
        verify: :verify_peer,
        server_name: "localhost"
      ]

      {:ok, c} = MaculaQuic.async_connect("::1", py.listen_port, opts)
      assert_receive {:quic, :connected, ^c, %{alpns: @alpn, is_resumed: false}}, @wait
      {:ok, s} = MaculaQuic.open_stream(c, active: true)
      :ok = MaculaQuic.send(s, "over async_connect", 4)
      assert collect(s) == "over async_connect"
      :ok = MaculaQuic.close_connection(c)

      # aioquic's certificate checked against another CA: refused before `connected`.
      {:ok, c2} =
        MaculaQuic.async_connect(
          "::1",
          py.listen_port,
          Keyword.put(opts, :cacertfile, certs.other_ca)
        )

      assert_receive {:quic, :transport_shutdown, ^c2, %{status: :tls_error}}, @wait
      assert_receive {:quic, :closed, ^c2, %{is_handshake_completed: false}}, @wait
      refute_received {:quic, :connected, ^c2, _}
    end

    test "no common ALPN fails with no_application_protocol", %{certs: certs} do
      py = aioquic_server("127.0.0.1", certs)

      assert {:error, {:tls_alert, :no_application_protocol}} =
               our_client("127.0.0.1", py.listen_port, certs, alpn: ["nobody-speaks-this"])
    end
  end

  describe "certificates: aioquic verifies our listener" do
    test "valid chain (v4 by name, v6 by IP address)", %{certs: certs} do
      {_pid, _l, port} = our_listener("127.0.0.1", certs)
      py = aioquic_client("127.0.0.1", port, certs)
      assert %{"alpn" => @alpn} = Py.await(py, %{"event" => "connected"})
      new_conn()

      {_pid, _l, port6} = our_listener("::1", certs)
      py6 = aioquic_client("::1", port6, certs, server_name: "::1")
      assert %{"alpn" => @alpn} = Py.await(py6, %{"event" => "connected"})
      new_conn()
    end

    test "our certificate checked against another CA fails, and no connection is delivered",
         %{certs: certs} do
      {_pid, _l, port} = our_listener("127.0.0.1", certs)
      py = aioquic_client("127.0.0.1", port, certs, cafile: certs.other_ca)
      assert %{"event" => "connect_failed"} = Py.await(py, %{"event" => "connect_failed"})
      refute_receive {:echo, {:quic, :new_conn, _, _}}, 200
    end

    test "a certificate for another name fails", %{certs: certs} do
      {_pid, _l, port} = our_listener("127.0.0.1", certs)
      py = aioquic_client("127.0.0.1", port, certs, server_name: "wrong.example")
      assert %{"event" => "connect_failed"} = Py.await(py, %{"event" => "connect_failed"})

      {_pid, _l, port2} =
        our_listener("::1", certs, certfile: certs.wrong_name_cert, keyfile: certs.wrong_name_key)

      py2 = aioquic_client("::1", port2, certs)
      assert %{"event" => "connect_failed"} = Py.await(py2, %{"event" => "connect_failed"})
      refute_receive {:echo, {:quic, :new_conn, _, _}}, 200
    end

    test "no common ALPN fails", %{certs: certs} do
      {_pid, _l, port} = our_listener("127.0.0.1", certs)
      py = aioquic_client("127.0.0.1", port, certs, alpn: ["nobody-speaks-this"])
      assert %{"event" => "connect_failed"} = Py.await(py, %{"event" => "connect_failed"})
      refute_receive {:echo, {:quic, :new_conn, _, _}}, 200
    end
  end
end
