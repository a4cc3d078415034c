defmodule MaculaQuic.Native.Loader do
  @moduledoc false
  # Compile-time resolution of the native library (minimal version: build from source).
  # The full precompiled path (download, checksum, cache) lands with the foundation issue.

  @crate "macula_quic"

  @doc false
  @spec prepare!(keyword()) :: String.t()
  def prepare!(opts) do
    app = Keyword.fetch!(opts, :otp_app)
    crate_dir = Path.expand("native/#{@crate}", Keyword.fetch!(opts, :project_dir))
    priv = Path.join(Mix.Project.app_path(), "priv/native")
    build_from_source!(crate_dir, priv)
    _ = app
    "native/lib#{@crate}"
  end

  defp build_from_source!(crate_dir, priv) do
    args = ["build", "--release", "--manifest-path", Path.join(crate_dir, "Cargo.toml")]
    Mix.shell().info("Compiling NIF crate #{@crate} (cargo #{Enum.join(args, " ")})")

    case System.cmd("cargo", args, into: IO.stream(:stdio, :line), stderr_to_stdout: true) do
      {_, 0} -> :ok
      {_, code} -> Mix.raise("cargo build failed with exit status #{code}")
    end

    File.mkdir_p!(priv)
    src = Path.join([crate_dir, "target", "release", "lib#{@crate}.so"])
    File.cp!(src, Path.join(priv, "lib#{@crate}.so"))
  end
end
