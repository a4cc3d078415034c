defmodule MaculaQuic.MixProject do
  use Mix.Project

  @version "0.1.0-dev"
  @source_url "https://github.com/macula-io/macula_quic"

  def project do
    [
      app: :macula_quic,
      version: @version,
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      # hex.pm is unreachable where this package is built: no Hex dependencies, ever.
      deps: [],
      elixirc_paths: elixirc_paths(Mix.env()),
      description:
        "QUIC for Elixir and Erlang: Quinn (Rust) bound through a NIF, with exact address binding and real back-pressure.",
      package: package(),
      # A package whose checksum file does not list every artifact of its version would give
      # its users no NIF: `mix macula_quic.checksum --check` refuses to let it be published.
      aliases: ["hex.publish": ["macula_quic.checksum --check", "hex.publish"]],
      docs: [main: "MaculaQuic", source_url: @source_url, source_ref: "v#{@version}"],
      source_url: @source_url
    ]
  end

  def application do
    [extra_applications: [:logger, :crypto, :public_key, :inets, :ssl]]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]

  defp package do
    [
      licenses: ["Apache-2.0"],
      links: %{"GitHub" => @source_url},
      files:
        ~w(lib native/macula_quic/src native/macula_quic/Cargo.toml native/macula_quic/Cargo.lock
                native/macula_quic/.cargo include checksum-*.exs mix.exs README.md LICENSE .formatter.exs)
    ]
  end
end
