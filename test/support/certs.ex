defmodule MaculaQuic.Test.Certs do
  @moduledoc false
  # Test PKI made with the openssl CLI (bin/setup installs it): a CA and a server certificate
  # valid for "localhost", 127.0.0.1 and ::1; a client CA and client certificate for mutual
  # TLS; and an unrelated CA with its own certificate.
  #
  # Why not :public_key.pkix_test_data/1: OTP encodes the ecdsa-with-SHA256 algorithm
  # identifier with NULL parameters, which webpki (rustls) rejects as a bad signature.

  @doc """
  A new, empty directory under the system's temporary directory, unique across test runs (a
  unique integer alone repeats from one VM to the next, so two runs could share a directory,
  and a run killed before its cleanup left one behind for the next).
  """
  def fresh_dir!(prefix) do
    dir =
      Path.join(
        System.tmp_dir!(),
        "#{prefix}_#{System.os_time()}_#{System.unique_integer([:positive])}"
      )

    File.rm_rf!(dir)
    File.mkdir_p!(dir)
    dir
  end

  @doc false
  def generate!(dir) do
    File.mkdir_p!(dir)
    ca = ca!(dir, "ca", "Test CA")
    client_ca = ca!(dir, "client_ca", "Client CA")
    other_ca = ca!(dir, "other_ca", "Other CA")

    server =
      leaf!(dir, "server", ca, "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1")

    client = leaf!(dir, "client", client_ca, "client", "extendedKeyUsage=clientAuth")

    other =
      leaf!(
        dir,
        "other",
        other_ca,
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
      )

    %{
      ca: ca.cert,
      client_ca: client_ca.cert,
      other_ca: other_ca.cert,
      cert: server.cert,
      key: server.key,
      client_cert: client.cert,
      client_key: client.key,
      other_cert: other.cert,
      other_key: other.key,
      cert_der: der!(["x509", "-in", server.cert, "-outform", "der"]),
      key_der: der!(["pkcs8", "-topk8", "-nocrypt", "-in", server.key, "-outform", "der"])
    }
  end

  defp ca!(dir, name, cn) do
    key = key!(dir, name)
    cert = Path.join(dir, "#{name}.pem")

    openssl!([
      "req",
      "-x509",
      "-new",
      "-key",
      key,
      "-subj",
      "/CN=#{cn}",
      "-days",
      "30",
      "-out",
      cert
    ])

    %{key: key, cert: cert}
  end

  defp leaf!(dir, name, ca, cn, ext) do
    key = key!(dir, "#{name}_key")
    csr = Path.join(dir, "#{name}.csr")
    ext_file = Path.join(dir, "#{name}.ext")
    cert = Path.join(dir, "#{name}.pem")
    File.write!(ext_file, ext <> "\nbasicConstraints=CA:FALSE\n")
    openssl!(["req", "-new", "-key", key, "-subj", "/CN=#{cn}", "-out", csr])

    openssl!(
      ~w(x509 -req -in #{csr} -CA #{ca.cert} -CAkey #{ca.key} -CAcreateserial -days 30) ++
        ["-extfile", ext_file, "-out", cert]
    )

    %{key: key, cert: cert}
  end

  defp key!(dir, name) do
    path = Path.join(dir, "#{name}.key.pem")
    openssl!(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path])
    path
  end

  defp der!(args) do
    {out, 0} = System.cmd("openssl", args)
    out
  end

  defp openssl!(args) do
    case System.cmd("openssl", args, stderr_to_stdout: true) do
      {_, 0} -> :ok
      {out, code} -> raise "openssl #{Enum.join(args, " ")} failed (#{code}): #{out}"
    end
  end
end
