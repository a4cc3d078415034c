defmodule MaculaQuic.Native do
  @moduledoc false
  # NIF stubs. Each function here is implemented in native/macula_quic (Rust); the stub only
  # runs when the library failed to load.

  @crate_dir Path.expand("../../native/macula_quic", __DIR__)
  for file <-
        Path.wildcard(Path.join(@crate_dir, "src/**/*.rs")) ++
          Path.wildcard(Path.join(@crate_dir, "Cargo.{toml,lock}")) do
    @external_resource file
  end

  @lib_path MaculaQuic.Native.Loader.prepare!(
              otp_app: :macula_quic,
              project_dir: Path.expand("../..", __DIR__)
            )

  @on_load :__load_nif__

  @doc false
  def __load_nif__ do
    path = :filename.join(:code.priv_dir(:macula_quic), @lib_path)

    case :erlang.load_nif(path, 0) do
      :ok ->
        :ok

      {:error, {reason, text}} ->
        :logger.error(~c"macula_quic: could not load NIF library ~s: ~p ~s", [path, reason, text])
        :ok
    end
  end

  defp nif_error, do: :erlang.nif_error(:nif_not_loaded)

  def ping, do: nif_error()
end
