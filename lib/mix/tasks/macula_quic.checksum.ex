defmodule Mix.Tasks.MaculaQuic.Checksum do
  @shortdoc "Writes checksum-Elixir.MaculaQuic.Native.exs from release artifacts"

  @moduledoc """
  Computes the SHA-256 of every precompiled NIF tarball of a release and writes
  `checksum-Elixir.MaculaQuic.Native.exs`, which the package ships and the loader checks
  downloads against (the equivalent of `mix rustler_precompiled.download
  MaculaQuic.Native --all`).

      mix macula_quic.checksum --all
      mix macula_quic.checksum --all --dir path/to/artifacts --print
      mix macula_quic.checksum --only-local --base-url https://mirror.example/v0.2.0
      mix macula_quic.checksum --check

  Exactly one of:

    * `--all` - every supported target x NIF version
    * `--only-local` - only the artifact this machine would download
    * `--check` - write nothing: fail unless the checksum file is fit to ship with the
      version, that is, for a release version it lists exactly the tarballs of every target
      x NIF version, each with a well-formed SHA-256 (a `-dev` version builds from source and
      needs none). `mix hex.publish` runs this first (an alias in mix.exs), so a package whose
      checksum file was never written, or was written with `--only-local` or
      `--ignore-unavailable`, is not published: its users would get no NIF.

  Options:

    * `--dir DIR` - read the tarballs from a local directory instead of downloading them
    * `--base-url URL` - where to download them from (default: `MACULA_QUIC_BASE_URL`, else
      the GitHub release of the version)
    * `--version VSN` - the release version (default: the project's)
    * `--checksum-file PATH` - where to write (default: the project root's file)
    * `--print` - also print `<sha256>  <file>` lines (the `sha256sum` format)
    * `--ignore-unavailable` - skip artifacts that are absent (missing file or HTTP 404)
      instead of failing
    * `--max-retries N` - download retries on network errors (default 3)

  Every tarball must contain its library under the expected name; a malformed one fails the
  task, so a broken release asset never gets a checksum.
  """

  use Mix.Task

  alias MaculaQuic.Native.{Artifact, Checksum, Download, Loader, Precompiled, Target}

  @switches [
    all: :boolean,
    only_local: :boolean,
    dir: :string,
    base_url: :string,
    version: :string,
    checksum_file: :string,
    print: :boolean,
    ignore_unavailable: :boolean,
    max_retries: :integer,
    check: :boolean
  ]

  @impl Mix.Task
  @spec run([String.t()]) :: :ok
  def run(args) do
    {opts, _rest} = OptionParser.parse!(args, strict: @switches)

    version =
      opts[:version] || Mix.Project.config()[:version] || Mix.raise("--version is required")

    if opts[:check], do: check!(opts, version), else: write!(opts, version)
  end

  defp write!(opts, version) do
    source = source(opts, version)

    results = Enum.map(artifacts(opts, version), &fetch(&1, source, opts))
    checksums = checksums!(results, opts)

    path = opts[:checksum_file] || Checksum.path(project_dir())

    case Checksum.write(path, checksums) do
      :ok -> :ok
      {:error, reason} -> Mix.raise("Could not write #{path}: #{:file.format_error(reason)}")
    end

    if opts[:print], do: print(checksums)
    Mix.shell().info("Wrote #{map_size(checksums)} checksum(s) to #{path}")
  end

  defp check!(opts, version) do
    if opts[:all] || opts[:only_local],
      do: Mix.raise("--check takes neither --all nor --only-local")

    path = opts[:checksum_file] || Checksum.path(project_dir())

    if Loader.build_from_source?(%{}, false, version) do
      Mix.shell().info(
        "#{version} is a development version: it builds from source (#{path} unused)"
      )
    else
      checksums =
        case Checksum.read(path) do
          {:ok, checksums} -> checksums
          {:error, reason} -> Mix.raise(Loader.format_error(reason))
        end

      expected = for {tarball, _file} <- all_artifacts(version), do: tarball
      problems = checksum_problems(checksums, expected)

      if problems != [] do
        Mix.raise(
          "#{path} is not fit to ship with #{version}:\n  " <>
            Enum.join(problems, "\n  ") <>
            "\nWrite it from the release's assets: " <>
            "MACULA_QUIC_BUILD=1 mix macula_quic.checksum --all (see RELEASE.md)."
        )
      end

      Mix.shell().info("#{path} lists the #{length(expected)} artifacts of #{version}")
    end

    :ok
  end

  defp checksum_problems(checksums, expected) do
    missing = for t <- expected, not Map.has_key?(checksums, t), do: "missing: #{t}"

    extra =
      for {t, _} <- checksums, t not in expected, do: "not an artifact of this version: #{t}"

    malformed =
      for {t, sum} <- checksums,
          not Regex.match?(~r/\Asha256:[0-9a-f]{64}\z/, sum),
          do: "not a SHA-256: #{t} => #{inspect(sum)}"

    Enum.sort(missing) ++ Enum.sort(extra) ++ Enum.sort(malformed)
  end

  # [{tarball_name, library_file_name}] for the requested scope.
  defp artifacts(opts, version) do
    case {opts[:all], opts[:only_local]} do
      {true, true} -> Mix.raise("Pass only one of --all and --only-local")
      {true, _} -> all_artifacts(version)
      {_, true} -> [local_artifact(version)]
      _ -> Mix.raise("Pass --all (every target and NIF version), --only-local or --check")
    end
  end

  defp all_artifacts(version) do
    for target <- Target.targets(), nif <- Target.nif_versions() do
      {Artifact.tarball_name(version, nif, target), Artifact.file_name(version, nif, target)}
    end
  end

  defp local_artifact(version) do
    case Target.resolve(Target.host()) do
      {:ok, %{target: target, nif_version: nif}} ->
        {Artifact.tarball_name(version, nif, target), Artifact.file_name(version, nif, target)}

      {:error, reason} ->
        Mix.raise(Loader.format_error(reason))
    end
  end

  defp source(opts, version) do
    case opts[:dir] do
      nil -> {:url, opts[:base_url] || Loader.base_url(System.get_env(), version)}
      dir -> {:dir, dir}
    end
  end

  defp fetch({tarball, file_name}, source, opts) do
    case read(tarball, source, opts) do
      {:ok, content} -> {:ok, tarball, checked_sum(content, tarball, file_name)}
      {:error, :unavailable, where} -> {:unavailable, tarball, where}
      {:error, reason} -> Mix.raise(Loader.format_error(reason))
    end
  end

  # A tarball is summed only if it holds the library it should.
  defp checked_sum(content, tarball, file_name) do
    case Precompiled.library_from_tarball(content, tarball, file_name) do
      {:ok, _library} -> Checksum.sha256(content)
      {:error, reason} -> Mix.raise(Loader.format_error(reason))
    end
  end

  defp read(tarball, {:dir, dir}, _opts) do
    path = Path.join(dir, tarball)

    case File.read(path) do
      {:ok, content} -> {:ok, content}
      {:error, :enoent} -> {:error, :unavailable, path}
      {:error, reason} -> Mix.raise("Could not read #{path}: #{:file.format_error(reason)}")
    end
  end

  defp read(tarball, {:url, base_url}, opts) do
    url = Precompiled.url(base_url, tarball)
    download_opts = Keyword.take(opts, [:max_retries])

    case Download.get(url, download_opts) do
      {:ok, content} -> {:ok, content}
      {:error, {:http_status, _, 404}} -> {:error, :unavailable, url}
      {:error, reason} -> {:error, reason}
    end
  end

  defp checksums!(results, opts) do
    unavailable = for {:unavailable, _tarball, where} <- results, do: where

    if unavailable != [] and !opts[:ignore_unavailable] do
      Mix.raise(
        "#{length(unavailable)} artifact(s) not available:\n  " <>
          Enum.join(unavailable, "\n  ") <>
          "\nWait for the release workflow to attach them, or pass --ignore-unavailable."
      )
    end

    Enum.each(unavailable, &Mix.shell().info("Skipping unavailable #{&1}"))
    Map.new(for {:ok, tarball, sum} <- results, do: {tarball, sum})
  end

  defp print(checksums) do
    checksums
    |> Enum.sort()
    |> Enum.each(fn {tarball, "sha256:" <> hex} -> Mix.shell().info("#{hex}  #{tarball}") end)
  end

  defp project_dir do
    case Mix.Project.project_file() do
      nil -> File.cwd!()
      file -> Path.dirname(file)
    end
  end
end
