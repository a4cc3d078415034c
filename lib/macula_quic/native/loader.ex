defmodule MaculaQuic.Native.Loader do
  @moduledoc false
  # Compile-time resolution of the NIF library for MaculaQuic.Native: either build it from
  # source with cargo, or install a precompiled, checksum-verified release artifact.
  # Internal (called from MaculaQuic.Native's module body); this module is the boundary
  # where internal {:error, reason} tuples become Mix errors that say what to do.
  #
  # Decision (same conventions as RustlerPrecompiled-based packages):
  #   * build from source when MACULA_QUIC_BUILD is "1"/"true", when
  #     `config :macula_quic, build_from_source: true` (or RustlerPrecompiled's `force_build`
  #     or `force_build_all` config, or its RUSTLER_PRECOMPILED_FORCE_BUILD_ALL), or when the
  #     version is a "-dev" pre-release (a git checkout never has release artifacts);
  #   * otherwise download libmacula_quic-v<vsn>-nif-<nif>-<target>.so.tar.gz from
  #     MACULA_QUIC_BASE_URL (default: the GitHub release of that version) into
  #     MACULA_QUIC_CACHE_DIR (default: the user cache dir), verify it against
  #     checksum-Elixir.MaculaQuic.Native.exs, and extract it into priv/native.
  #
  # Every input can be given as an option; the environment and Mix are only consulted for
  # options left out, so tests run the whole path with explicit directories and URLs.

  alias MaculaQuic.Native.{Artifact, Checksum, Precompiled, SourceBuild, Target}

  @truthy ["1", "true"]

  @type option ::
          {:otp_app, atom()}
          | {:project_dir, Path.t()}
          | {:version, String.t()}
          | {:env, %{optional(String.t()) => String.t()}}
          | {:build_from_source, boolean()}
          | {:base_url, String.t()}
          | {:cache_dir, Path.t() | nil}
          | {:priv_dir, Path.t()}
          | {:checksum_file, Path.t()}
          | {:target, String.t()}
          | {:nif_version, String.t()}
          | {:max_retries, non_neg_integer()}
          | {:retry_delay_ms, non_neg_integer()}
          | {:cargo, String.t()}
          | {:cargo_features, [String.t()]}
          | {:root_dir, Path.t()}

  @doc """
  Resolves the NIF library and returns its path relative to the priv dir, without
  extension (what `@on_load` passes to `:erlang.load_nif/2`). Raises `Mix.Error` with an
  actionable message on failure. See `prepare/1` for the options.
  """
  @spec prepare!([option()]) :: String.t()
  def prepare!(opts) do
    case prepare(opts) do
      {:ok, lib_path} -> lib_path
      {:error, reason} -> Mix.raise(format_error(reason))
    end
  end

  @doc """
  Like `prepare!/1`, returning `{:ok, lib_path}` or `{:error, reason}`.

  Options (each defaults from the environment or Mix when left out):
  `:otp_app` and `:project_dir` (required), `:version` (the Mix project's), `:env` (map of
  environment variables, `System.get_env/0`), `:build_from_source`, `:base_url`,
  `:cache_dir`, `:priv_dir` (the app's priv dir under _build), `:checksum_file`, `:target`
  and `:nif_version` (derived from the running VM), `:max_retries`, `:retry_delay_ms`,
  `:cargo` (executable) and `:cargo_features` (extra crate features; any make it a source
  build, since precompiled libraries have none), `:root_dir` (what relative paths in the
  environment are relative to: the project being built, the one whose deps directory holds
  this package).
  """
  @spec prepare([option()]) :: {:ok, String.t()} | {:error, term()}
  def prepare(opts) do
    env =
      opts
      |> Keyword.get_lazy(:env, &System.get_env/0)
      |> expand_relative_paths(Keyword.get_lazy(opts, :root_dir, &root_dir/0))

    version = Keyword.get_lazy(opts, :version, fn -> Mix.Project.config()[:version] end)
    priv_dir = Keyword.get_lazy(opts, :priv_dir, &default_priv_dir/0)

    if source_build?(opts, env, version) do
      build(opts, priv_dir)
    else
      install(opts, env, version, priv_dir)
    end
  end

  @doc """
  Whether to build from source: MACULA_QUIC_BUILD (or RustlerPrecompiled's
  RUSTLER_PRECOMPILED_FORCE_BUILD_ALL, for every package) is "1"/"true" in `env`,
  `configured` is true (the app's `:build_from_source` config), or `version` is a "dev"
  pre-release.
  """
  @spec build_from_source?(%{optional(String.t()) => String.t()}, boolean(), String.t()) ::
          boolean()
  def build_from_source?(env, configured, version) do
    Map.get(env, "MACULA_QUIC_BUILD") in @truthy or
      Map.get(env, "RUSTLER_PRECOMPILED_FORCE_BUILD_ALL") in @truthy or
      configured == true or dev_version?(version)
  end

  @path_variables ["MACULA_QUIC_CACHE_DIR", "HEX_CACERTS_PATH"]

  @doc """
  `env` with the paths MACULA_QUIC_CACHE_DIR and HEX_CACERTS_PATH made absolute against
  `root_dir`, the project being built (see `prepare/1`'s `:root_dir`). Why: Mix compiles a
  dependency from inside its own directory, so a relative `MACULA_QUIC_CACHE_DIR=cache` would
  otherwise land in deps/macula_quic/cache, and a relative HEX_CACERTS_PATH would not be found
  at all. (RUSTLER_PRECOMPILED_GLOBAL_CACHE_PATH is left as given, as RustlerPrecompiled's
  packages take it, so that all of them share one cache.)
  """
  @spec expand_relative_paths(%{optional(String.t()) => String.t()}, Path.t()) :: %{
          optional(String.t()) => String.t()
        }
  def expand_relative_paths(env, root_dir) do
    Enum.reduce(@path_variables, env, fn name, acc ->
      case Map.get(acc, name) do
        path when is_binary(path) and path != "" ->
          Map.put(acc, name, Path.expand(path, root_dir))

        _ ->
          acc
      end
    end)
  end

  # The project being built: the directory above its deps directory, which a dependency's
  # compile shares with the project that depends on it (in an umbrella, the umbrella's root).
  # Mix's working directory is the dependency's own then; the shell's PWD may be stale (an
  # editor or a port that started mix elsewhere).
  defp root_dir do
    Path.dirname(Mix.Project.deps_path())
  rescue
    _ -> File.cwd!()
  end

  @doc """
  The download cache directory: MACULA_QUIC_CACHE_DIR in `env`, else RustlerPrecompiled's
  RUSTLER_PRECOMPILED_GLOBAL_CACHE_PATH (shared by every package, a place to put artifacts
  ahead of time), else the user cache dir, or `nil` (no caching) when there is none (no HOME).
  """
  @spec cache_dir(%{optional(String.t()) => String.t()}) :: Path.t() | nil
  def cache_dir(env) do
    ["MACULA_QUIC_CACHE_DIR", "RUSTLER_PRECOMPILED_GLOBAL_CACHE_PATH"]
    |> Enum.map(&Map.get(env, &1))
    |> Enum.find(&(is_binary(&1) and &1 != ""))
    |> Kernel.||(user_cache_dir())
  end

  # :filename.basedir/2 raises without HOME (some CI runners and containers). A shared
  # directory such as /tmp would be no substitute: another user could create it first, and
  # plant links where the download is written.
  defp user_cache_dir do
    :filename.basedir(:user_cache, ~c"macula_quic") |> List.to_string()
  rescue
    _ -> nil
  end

  @doc """
  Where release artifacts are downloaded from: MACULA_QUIC_BASE_URL in `env`, else the
  GitHub release of `version`.
  """
  @spec base_url(%{optional(String.t()) => String.t()}, String.t()) :: String.t()
  def base_url(env, version) do
    case Map.get(env, "MACULA_QUIC_BASE_URL") do
      url when is_binary(url) and url != "" -> url
      _ -> Artifact.default_base_url(version)
    end
  end

  @doc """
  The message shown for a failure `reason` from `prepare/1`.
  """
  @spec format_error(term()) :: String.t()
  def format_error(reason), do: message(reason) <> "\n\n" <> remedy(reason)

  defp source_build?(opts, env, version) do
    case {Keyword.fetch(opts, :build_from_source), Keyword.get(opts, :cargo_features, [])} do
      {{:ok, value}, _} -> value == true
      # A precompiled library has no extra features (the test suite's hooks): build them.
      {:error, [_ | _]} -> true
      {:error, _} -> build_from_source?(env, configured_build?(opts), version)
    end
  end

  # The app's own `build_from_source`, or RustlerPrecompiled's application config, as its
  # users write it: `config :rustler_precompiled, :force_build, macula_quic: true` for this
  # package, `config :rustler_precompiled, force_build_all: true` for every package.
  defp configured_build?(opts) do
    app = Keyword.get(opts, :otp_app, :macula_quic)

    force_build =
      case Application.get_env(:rustler_precompiled, :force_build) do
        list when is_list(list) -> List.keyfind(list, app, 0)
        _ -> nil
      end

    Application.get_env(app, :build_from_source) == true or
      Application.get_env(:rustler_precompiled, :force_build_all) == true or
      force_build == {app, true}
  end

  defp dev_version?(version) do
    case Version.parse(version) do
      {:ok, %Version{pre: pre}} -> "dev" in pre
      :error -> false
    end
  end

  defp build(opts, priv_dir) do
    request = %{
      crate_dir: crate_dir(opts),
      native_dir: Path.join(priv_dir, "native"),
      cargo: Keyword.get(opts, :cargo, "cargo"),
      features: Keyword.get(opts, :cargo_features, [])
    }

    info("Building the macula_quic NIF from source (cargo build --release)")

    with {:ok, _path} <- SourceBuild.build(request) do
      {:ok, SourceBuild.lib_path(request.features)}
    end
  end

  defp install(opts, env, version, priv_dir) do
    with {:ok, platform} <- platform(opts) do
      %{target: target, nif_version: nif} = platform
      request = precompiled_request(opts, env, version, priv_dir, platform)
      info("Installing precompiled NIF #{request.tarball}")

      with {:ok, _path} <- Precompiled.install(request) do
        {:ok, "native/" <> Artifact.lib_name(version, nif, target)}
      end
    end
  end

  defp precompiled_request(opts, env, version, priv_dir, %{target: target, nif_version: nif}) do
    %{
      tarball: Artifact.tarball_name(version, nif, target),
      file_name: Artifact.file_name(version, nif, target),
      base_url: Keyword.get_lazy(opts, :base_url, fn -> base_url(env, version) end),
      cache_dir: Keyword.get_lazy(opts, :cache_dir, fn -> cache_dir(env) end),
      native_dir: Path.join(priv_dir, "native"),
      checksum_file:
        Keyword.get_lazy(opts, :checksum_file, fn -> Checksum.path(project_dir(opts)) end),
      download: Keyword.take(opts, [:max_retries, :retry_delay_ms]) ++ [env: env]
    }
  end

  # Explicit :target/:nif_version win; otherwise both are derived from the running VM.
  defp platform(opts) do
    case {Keyword.get(opts, :target), Keyword.get(opts, :nif_version)} do
      {target, nif} when is_binary(target) and is_binary(nif) ->
        {:ok, %{target: target, nif_version: nif}}

      {target, nif} ->
        with {:ok, derived} <- Target.resolve(host(opts)) do
          {:ok, %{target: target || derived.target, nif_version: nif || derived.nif_version}}
        end
    end
  end

  defp host(opts) do
    host = Target.host()

    case Keyword.fetch(opts, :env) do
      {:ok, env} -> %{host | env: env}
      :error -> host
    end
  end

  defp project_dir(opts), do: Keyword.fetch!(opts, :project_dir)
  defp crate_dir(opts), do: Path.join([project_dir(opts), "native", Artifact.crate()])
  defp default_priv_dir, do: Path.join(Mix.Project.app_path(), "priv")

  defp info(message), do: Mix.shell().info(message)

  @build_hint "To build the NIF from source instead (needs Rust, https://rustup.rs), set " <>
                "MACULA_QUIC_BUILD=1 (or `config :macula_quic, build_from_source: true`) and " <>
                "recompile: `MACULA_QUIC_BUILD=1 mix deps.compile macula_quic --force`."

  defp message({:checksum_missing, name, path}),
    do: "macula_quic: no checksum for #{name} in #{path}; refusing to install it."

  defp message({:checksum_mismatch, name, expected, actual}),
    do:
      "macula_quic: checksum mismatch for #{name}: expected #{expected}, got #{actual}. " <>
        "Nothing was installed."

  defp message({:checksum_file_unreadable, path, reason}),
    do: "macula_quic: cannot read the checksum file #{path}: #{inspect(reason)}."

  defp message({:checksum_file_invalid, path}),
    do: "macula_quic: the checksum file #{path} is not a map of file names to checksums."

  defp message({:http_status, url, status}),
    do: "macula_quic: downloading #{url} failed with HTTP status #{status}."

  defp message({:http_failed, url, {:stalled, ms}}),
    do: "macula_quic: downloading #{url} stalled: nothing arrived for #{div(ms, 1000)} s."

  defp message({:http_failed, url, {:too_large, max}}),
    do:
      "macula_quic: #{url} is larger than #{div(max, 1024 * 1024)} MiB, which no NIF is: " <>
        "that address does not serve the release's files."

  defp message({:http_failed, url, reason}),
    do: "macula_quic: could not download #{url}: #{inspect(reason)}."

  defp message({:cached_and_download_failed, cached, download}),
    do:
      "macula_quic: the cached tarball is unusable (#{message(cached)}) and fetching it again " <>
        "failed (#{message(download)})"

  defp message({:bad_tarball, name, reason}),
    do: "macula_quic: #{name} is not a valid NIF tarball: #{inspect(reason)}."

  defp message({:write_failed, path, reason}),
    do: "macula_quic: could not write #{path}: #{inspect(reason)}."

  defp message({:unsupported_target, target, targets}),
    do:
      "macula_quic: no precompiled NIF for target #{target}. " <>
        "Precompiled targets: #{Enum.join(targets, ", ")}."

  defp message({:unsupported_nif_version, current, available}),
    do:
      "macula_quic: no precompiled NIF for NIF version #{current} " <>
        "(available: #{Enum.join(available, ", ")})."

  defp message({:cargo_missing, cargo}),
    do: "macula_quic: `#{cargo}` was not found, but the NIF must be built from source."

  defp message({:cargo_failed, status}),
    do: "macula_quic: `cargo build --release` failed with exit status #{status} (output above)."

  defp message({:library_missing, path}),
    do: "macula_quic: cargo succeeded but #{path} does not exist."

  defp message(other), do: "macula_quic: could not prepare the NIF library: #{inspect(other)}."

  defp remedy({:checksum_missing, _, _}),
    do:
      "The checksum file shipped with the package lists every precompiled artifact; this " <>
        "one is not listed. If you are releasing macula_quic, run " <>
        "`MACULA_QUIC_BUILD=1 mix macula_quic.checksum --all` (see RELEASE.md). " <> @build_hint

  defp remedy({:checksum_mismatch, _, _, _}),
    do:
      "The download was corrupted or altered (check MACULA_QUIC_BASE_URL if you use a " <>
        "mirror). " <> @build_hint

  # What would fix the download fixes this too: the cache is only ever filled by one.
  defp remedy({:cached_and_download_failed, _, download}), do: remedy(download)

  defp remedy({:http_status, _, 404}),
    do:
      "No precompiled NIF is published at that address (check MACULA_QUIC_BASE_URL). " <>
        @build_hint

  defp remedy({:http_failed, _, {:no_cacerts, _}}),
    do:
      "The system's CA certificates could not be loaded to verify the download: install them " <>
        "(the ca-certificates package), or set HEX_CACERTS_PATH to a PEM file of trusted CA " <>
        "certificates. " <> @build_hint

  defp remedy({:http_failed, _, {:too_large, _}}),
    do:
      "Check MACULA_QUIC_BASE_URL and any proxy between here and the release; or put the " <>
        "tarball in the cache directory (MACULA_QUIC_CACHE_DIR). " <> @build_hint

  defp remedy({status_or_network, _, _}) when status_or_network in [:http_status, :http_failed],
    do:
      "Check the network and the HTTPS_PROXY/HTTP_PROXY settings (behind a proxy that " <>
        "intercepts TLS, set HEX_CACERTS_PATH to its CA certificate), or put the tarball in " <>
        "the cache directory (MACULA_QUIC_CACHE_DIR). " <> @build_hint

  defp remedy({:cargo_missing, _}),
    do:
      "Install Rust (https://rustup.rs) so cargo is on the PATH. The NIF is built from " <>
        "source for a \"-dev\" version of macula_quic, with MACULA_QUIC_BUILD=1 or " <>
        "RUSTLER_PRECOMPILED_FORCE_BUILD_ALL=1, and with `config :macula_quic, " <>
        "build_from_source: true` or RustlerPrecompiled's `force_build`/`force_build_all` " <>
        "config; without any of those, a released version downloads a precompiled NIF."

  defp remedy({:write_failed, _, _}),
    do:
      "Check that the directory exists and is writable by this user (on Windows, also that " <>
        "no running VM has the library loaded), then compile again."

  defp remedy({:cargo_failed, _}),
    do:
      "Fix the build error above (a recent stable Rust is required: `rustup update`), or use " <>
        "a released version of macula_quic with precompiled NIFs."

  defp remedy({:library_missing, _}), do: remedy({:cargo_failed, 0})
  defp remedy(_other), do: @build_hint
end
