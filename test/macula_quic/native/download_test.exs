defmodule MaculaQuic.Native.DownloadTest do
  # Real sockets: a local HTTP server and a local HTTPS server with a throw-away CA.
  use ExUnit.Case, async: false

  alias MaculaQuic.LoaderHttpServer
  alias MaculaQuic.Native.Download

  @moduletag :tmp_dir
  @moduletag :loader_network

  setup %{tmp_dir: dir} do
    File.write!(Path.join(dir, "file.bin"), "payload")
    :ok
  end

  test "plain HTTP GET; 404 is not retried", %{tmp_dir: dir} do
    server = LoaderHttpServer.start!(dir)
    on_exit(fn -> LoaderHttpServer.stop(server) end)

    assert Download.get(server.base_url <> "/file.bin", env: %{}) == {:ok, "payload"}

    # A 404 with a long backoff would take minutes if it were retried.
    assert Download.get(server.base_url <> "/nope", env: %{}, retry_delay_ms: 600_000) ==
             {:error, {:http_status, server.base_url <> "/nope", 404}}
  end

  describe "HTTPS" do
    setup %{tmp_dir: dir} do
      pki = LoaderHttpServer.test_pki()
      server = LoaderHttpServer.start_tls!(dir, pki.server_options)
      on_exit(fn -> LoaderHttpServer.stop(server) end)
      ca_file = Path.join(dir, "ca.pem")
      File.write!(ca_file, pki.ca_pem)
      %{server: server, ca_file: ca_file}
    end

    test "a server whose CA is not trusted is refused, at once", %{server: server} do
      url = server.base_url <> "/file.bin"
      # Trusting only another CA (not the host's store, which a container may lack). A retry
      # after a TLS refusal would wait the long backoff: it is not retried.
      other_cas =
        for {:Certificate, der, _} <- :public_key.pem_decode(LoaderHttpServer.test_pki().ca_pem),
            do: der

      assert {:error, {:http_failed, ^url, reason}} =
               Download.get(url,
                 env: %{},
                 cacerts: fn -> other_cas end,
                 retry_delay_ms: 600_000
               )

      assert inspect(reason) =~ "unknown_ca"
    end

    test "a trust store that cannot be loaded is an error that says what to do", %{
      server: server
    } do
      url = server.base_url <> "/file.bin"
      no_store = fn -> raise MatchError, term: {:error, :no_cacerts_found} end

      assert {:error, {:http_failed, ^url, {:no_cacerts, why}} = reason} =
               Download.get(url, env: %{}, cacerts: no_store, retry_delay_ms: 600_000)

      assert why =~ "no_cacerts_found"
      message = MaculaQuic.Native.Loader.format_error(reason)
      assert message =~ "ca-certificates"
      assert message =~ "HEX_CACERTS_PATH"
    end

    test "a VM without :public_key.cacerts_get/0 (before OTP 25) is told why", %{
      server: server
    } do
      url = server.base_url <> "/file.bin"
      before_otp25 = Function.capture(:public_key, :no_such_function_here, 0)

      assert {:error, {:http_failed, ^url, {:no_cacerts, why}} = reason} =
               Download.get(url, env: %{}, cacerts: before_otp25, max_retries: 0)

      assert why =~ "OTP 25"
      assert MaculaQuic.Native.Loader.format_error(reason) =~ "HEX_CACERTS_PATH"
    end

    test "a trusted CA (HEX_CACERTS_PATH) is accepted", %{server: server, ca_file: ca_file} do
      env = %{"HEX_CACERTS_PATH" => ca_file}
      assert Download.get(server.base_url <> "/file.bin", env: env) == {:ok, "payload"}
    end

    test "a HEX_CACERTS_PATH that is not a file is an error at once, not a failed connect", %{
      server: server,
      tmp_dir: dir
    } do
      url = server.base_url <> "/file.bin"
      missing = Path.join(dir, "no-such-ca.pem")

      assert {:error, {:http_failed, ^url, {:no_cacerts, why}}} =
               Download.get(url, env: %{"HEX_CACERTS_PATH" => missing}, max_retries: 0)

      assert why =~ missing
    end

    test "the host name is checked", %{server: server, ca_file: ca_file} do
      url = "https://127.0.0.1:#{server.port}/file.bin"
      env = %{"HEX_CACERTS_PATH" => ca_file}
      assert {:error, {:http_failed, ^url, reason}} = Download.get(url, env: env, max_retries: 0)
      assert inspect(reason) =~ "hostname_check_failed"
    end
  end

  describe "proxy_options/1" do
    test "none by default" do
      assert Download.proxy_options(%{}) == []
    end

    test "HTTP(S)_PROXY with credentials and NO_PROXY; loopback is never proxied" do
      env = %{
        "HTTPS_PROXY" => "http://user:p%40ss@proxy.corp:3128",
        "http_proxy" => "http://plain.corp",
        "NO_PROXY" => "internal.corp, .example.com"
      }

      no_proxy = [~c"internal.corp", ~c"*.example.com", ~c"localhost", ~c"127.0.0.1", ~c"::1"]

      assert Download.proxy_options(env) == [
               proxy: {{~c"plain.corp", 80}, no_proxy},
               https_proxy: {{~c"proxy.corp", 3128}, no_proxy}
             ]

      assert Download.proxy_auth(env) == [proxy_auth: {~c"user", ~c"p@ss"}]
      assert Download.proxy_auth(%{}) == []

      # Without a scheme (as curl accepts it): an HTTP proxy all the same.
      bare = %{"HTTPS_PROXY" => "u:pw@proxy.corp:3128", "HTTP_PROXY" => "plain.corp"}
      loopback = [~c"localhost", ~c"127.0.0.1", ~c"::1"]

      assert Download.proxy_options(bare) == [
               proxy: {{~c"plain.corp", 80}, loopback},
               https_proxy: {{~c"proxy.corp", 3128}, loopback}
             ]

      assert Download.proxy_auth(bare) == [proxy_auth: {~c"u", ~c"pw"}]
    end

    test ":httpc accepts them" do
      {:ok, _} = :inets.start(:httpc, profile: :macula_quic_proxy_test)
      on_exit(fn -> :inets.stop(:httpc, :macula_quic_proxy_test) end)

      opts = Download.proxy_options(%{"HTTPS_PROXY" => "http://u:p@proxy:8080"})
      assert :ok = :httpc.set_options(opts, :macula_quic_proxy_test)
    end

    test "requests to loopback bypass a configured proxy", %{tmp_dir: dir} do
      server = LoaderHttpServer.start!(dir)
      on_exit(fn -> LoaderHttpServer.stop(server) end)

      # The proxy port is closed: the request only succeeds if the proxy is bypassed.
      env = %{"HTTP_PROXY" => "http://user:secret@127.0.0.2:1"}
      assert Download.get(server.base_url <> "/file.bin", env: env) == {:ok, "payload"}
    end
  end

  describe "slow, stalled and oversized answers" do
    test "a slow body finishes: there is no limit on the whole download's time" do
      # Ten bytes, one every 60 ms: the whole takes twice the stall timeout, no gap does.
      parts = for digit <- ~c"0123456789", do: [{:sleep, 60}, {:send, <<digit>>}]
      url = script_server([{:send, headers(10)} | List.flatten(parts)])

      assert Download.get(url, env: %{}, stall_timeout_ms: 300, max_retries: 0) ==
               {:ok, "0123456789"}
    end

    test "an answer that stops coming fails as a stall, which is retried" do
      url = script_server([{:send, headers(100)}, {:send, "abc"}, :hold])

      assert Download.get(url, env: %{}, stall_timeout_ms: 200, max_retries: 1, retry_delay_ms: 1) ==
               {:error, {:http_failed, url, {:stalled, 200}}}

      assert_received {:served, _}
      assert_received {:served, _}
      refute_received {:served, _}
    end

    test "a server that never answers fails as a stall" do
      url = script_server([:hold])

      assert Download.get(url, env: %{}, stall_timeout_ms: 200, max_retries: 0) ==
               {:error, {:http_failed, url, {:stalled, 200}}}
    end

    test "a body over :max_bytes is refused, and not retried", %{tmp_dir: dir} do
      File.write!(Path.join(dir, "big.bin"), :binary.copy("x", 5_000))
      server = LoaderHttpServer.start!(dir)
      on_exit(fn -> LoaderHttpServer.stop(server) end)
      url = server.base_url <> "/big.bin"

      # A retry would wait ten minutes.
      assert Download.get(url, env: %{}, max_bytes: 1_000, retry_delay_ms: 600_000) ==
               {:error, {:http_failed, url, {:too_large, 1_000}}}

      assert Download.get(url, env: %{}, max_bytes: 5_000) == {:ok, :binary.copy("x", 5_000)}
    end

    test "a body refused part way leaves nothing behind in the caller's mailbox" do
      # 8 MB from a fast server, refused at 1 MB: :httpc goes on sending parts for a while
      # after the cancel. The server states no size here (chunked), so it is read up to the
      # limit.
      big = :crypto.strong_rand_bytes(8 * 1024 * 1024)
      url = script_server([{:send, chunked_headers()}, {:send, chunk(big)}, {:send, "0\r\n\r\n"}])

      assert Download.get(url, env: %{}, max_bytes: 1_000_000, max_retries: 0) ==
               {:error, {:http_failed, url, {:too_large, 1_000_000}}}

      refute_receive {:http, _}, 200
    end

    test "a download whose caller exits is given up at once, not left to its stall timeout" do
      test = self()
      url = script_server([{:send, headers(100)}, {:send, "abc"}, :await_close])

      caller =
        spawn(fn -> send(test, {:got, Download.get(url, env: %{}, stall_timeout_ms: 60_000)}) end)

      assert_receive {:served, _}, 5_000
      Process.exit(caller, :kill)
      # The server sees the connection closed: the download stopped with its caller.
      assert_receive :client_closed, 5_000
    end

    test "a stated size over :max_bytes is refused before the body is read" do
      # The server says 10 MB, sends 3 bytes and goes silent: nothing waits for the rest.
      url = script_server([{:send, headers(10_000_000)}, {:send, "abc"}, :hold])

      assert Download.get(url, env: %{}, max_bytes: 1_000, stall_timeout_ms: 5_000, max_retries: 0) ==
               {:error, {:http_failed, url, {:too_large, 1_000}}}
    end
  end

  defp chunked_headers,
    do: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"

  defp chunk(data), do: [Integer.to_string(byte_size(data), 16), "\r\n", data, "\r\n"]

  defp headers(length),
    do: "HTTP/1.1 200 OK\r\nContent-Length: #{length}\r\nConnection: close\r\n\r\n"

  # A raw HTTP server on loopback that answers every request by playing `script` ({:send,
  # data}, {:sleep, ms} for a slow link, :hold to go silent) and tells the test of each
  # connection it served. Returns the URL to fetch.
  defp script_server(script) do
    test = self()
    {:ok, listen} = :gen_tcp.listen(0, [:binary, ip: {127, 0, 0, 1}, active: false])
    {:ok, port} = :inet.port(listen)

    server =
      spawn(fn ->
        Stream.repeatedly(fn -> :gen_tcp.accept(listen) end)
        |> Enum.each(fn {:ok, socket} ->
          {:ok, _request} = :gen_tcp.recv(socket, 0)
          send(test, {:served, socket})
          # Linked: killing the server ends the connections it holds.
          player =
            spawn_link(fn ->
              Process.put(:test, test)
              receive(do: (:go -> play(socket, script)))
            end)

          :ok = :gen_tcp.controlling_process(socket, player)
          send(player, :go)
        end)
      end)

    :ok = :gen_tcp.controlling_process(listen, server)
    on_exit(fn -> Process.exit(server, :kill) end)
    "http://127.0.0.1:#{port}/file.bin"
  end

  # Reads until the client closes the connection, then tells the test.
  defp await_close(socket) do
    case :gen_tcp.recv(socket, 0) do
      {:ok, _} -> await_close(socket)
      {:error, _} -> send(Process.get(:test), :client_closed)
    end
  end

  defp play(socket, script) do
    Enum.each(script, fn
      {:send, data} -> :ok = :gen_tcp.send(socket, data)
      {:sleep, ms} -> Process.sleep(ms)
      :hold -> Process.sleep(:infinity)
      :await_close -> await_close(socket)
    end)
  end
end
