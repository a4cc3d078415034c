defmodule MaculaQuic.LoaderHttpServer do
  @moduledoc false
  # A real HTTP server (OTP's :inets httpd) on 127.0.0.1 and an ephemeral port, serving the
  # files of one directory. The loader and checksum-task tests download release artifacts
  # from it exactly as they would from a GitHub release or a mirror.

  @type t :: %{pid: pid(), port: :inet.port_number(), base_url: String.t()}

  @doc "Starts serving `dir` over HTTP (missing files answer 404)."
  @spec start!(Path.t()) :: t()
  def start!(dir), do: start!(dir, [], "http://127.0.0.1")

  @doc """
  Starts serving `dir` over HTTPS with `ssl_options` (certificate and key); the base URL
  names the host "localhost".
  """
  @spec start_tls!(Path.t(), keyword()) :: t()
  def start_tls!(dir, ssl_options),
    do: start!(dir, [socket_type: {:ssl, ssl_options}], "https://localhost")

  @doc """
  A throw-away CA and a server certificate for "localhost" signed by it: the server's
  ssl options and the CA certificate as PEM.
  """
  @spec test_pki() :: %{server_options: keyword(), ca_pem: binary()}
  def test_pki do
    san = {:Extension, {2, 5, 29, 17}, false, [{:dNSName, ~c"localhost"}]}
    key = [key: {:namedCurve, :secp256r1}]
    chain = %{root: key, intermediates: [], peer: key}

    data =
      :public_key.pkix_test_data(%{
        server_chain: %{chain | peer: [extensions: [san]] ++ key},
        client_chain: chain
      })

    server = data.server_config

    pem =
      :public_key.pem_encode(for der <- server[:cacerts], do: {:Certificate, der, :not_encrypted})

    %{server_options: Keyword.take(server, [:cert, :key]), ca_pem: pem}
  end

  defp start!(dir, extra, url) do
    dir = dir |> Path.expand() |> String.to_charlist()

    {:ok, pid} =
      :inets.start(
        :httpd,
        [
          port: 0,
          bind_address: {127, 0, 0, 1},
          server_name: ~c"macula_quic_loader_test",
          server_root: dir,
          document_root: dir,
          modules: [:mod_alias, :mod_get]
        ] ++ extra
      )

    port = Keyword.fetch!(:httpd.info(pid), :port)
    %{pid: pid, port: port, base_url: "#{url}:#{port}"}
  end

  @doc "Stops the server; its port then refuses connections. Safe to call twice."
  @spec stop(t()) :: :ok
  def stop(%{pid: pid}) do
    _ = :inets.stop(:httpd, pid)
    :ok
  end
end
