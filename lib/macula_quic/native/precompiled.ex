defmodule MaculaQuic.Native.Precompiled do
  @moduledoc false
  # Puts a precompiled library in place: cached or downloaded tarball, verified against the
  # checksum file, extracted into priv/native. Internal to the loader; everything it needs
  # arrives as explicit options (no environment, no Mix), so tests drive it with a local
  # HTTP server and temporary directories.
  #
  # Order matters for safety: a tarball is verified BEFORE it is cached or extracted, a
  # cached tarball is verified again before use, and the library is written to a temporary
  # name and renamed into place, so a failure never leaves anything new in priv/native and
  # a running VM that has the old file mapped is never handed a half-written one.

  alias MaculaQuic.Native.{AtomicFile, Checksum, Download}

  @type request :: %{
          required(:tarball) => String.t(),
          required(:file_name) => String.t(),
          required(:base_url) => String.t(),
          required(:cache_dir) => Path.t() | nil,
          required(:native_dir) => Path.t(),
          required(:checksum_file) => Path.t(),
          optional(:download) => [Download.option()]
        }

  @type error ::
          Checksum.error()
          | Download.error()
          | {:bad_tarball, String.t(), term()}
          | {:cached_and_download_failed, Checksum.error(), Download.error()}
          | AtomicFile.error()

  @doc """
  Makes `native_dir/file_name` the verified library from the tarball `tarball`. A cached
  tarball in `cache_dir` (`nil`: no cache) is used when it still verifies; otherwise (absent, or corrupted)
  it is downloaded from `base_url/tarball`, verified, then cached. Returns the library's
  path.
  """
  @spec install(request()) :: {:ok, Path.t()} | {:error, error()}
  def install(request) do
    with {:ok, checksums} <- Checksum.read(request.checksum_file),
         :ok <- listed(request, checksums),
         {:ok, tarball} <- verified_tarball(request, checksums),
         {:ok, library} <- extract(tarball, request) do
      place(library, request)
    end
  end

  # An artifact the checksum file does not list can never be installed: say so before any
  # download (offline, a network error would hide the reason).
  defp listed(request, checksums) do
    if Map.has_key?(checksums, request.tarball),
      do: :ok,
      else: {:error, {:checksum_missing, request.tarball, request.checksum_file}}
  end

  @doc """
  The library inside `content` (the tarball named `tarball`), which must contain
  `file_name`; other members are ignored and nothing is written.
  """
  @spec library_from_tarball(binary(), String.t(), String.t()) ::
          {:ok, binary()} | {:error, {:bad_tarball, String.t(), term()}}
  def library_from_tarball(content, tarball, file_name) do
    extract(content, %{tarball: tarball, file_name: file_name})
  end

  @doc """
  The URL of `tarball` under `base_url`.
  """
  @spec url(String.t(), String.t()) :: String.t()
  def url(base_url, tarball), do: String.trim_trailing(base_url, "/") <> "/" <> tarball

  defp verified_tarball(%{cache_dir: nil} = request, checksums), do: download(request, checksums)

  defp verified_tarball(request, checksums) do
    cached = Path.join(request.cache_dir, request.tarball)

    case File.read(cached) do
      {:ok, content} -> use_cached(content, cached, request, checksums)
      {:error, _} -> download(request, checksums)
    end
  end

  # A cached tarball that no longer verifies (truncated, tampered, or left by an older
  # checksum file) is discarded and fetched again; the fresh copy must verify in turn.
  defp use_cached(content, cached, request, checksums) do
    case verify(request, content, checksums) do
      :ok ->
        {:ok, content}

      {:error, {:checksum_missing, _, _}} = missing ->
        missing

      {:error, cached_error} ->
        # Best effort: a cached file that cannot be removed is overwritten by the download.
        _ = File.rm(cached)

        case download(request, checksums) do
          {:ok, content} -> {:ok, content}
          {:error, {:http_status, _, _} = error} -> cached_failure(cached_error, error)
          {:error, {:http_failed, _, _} = error} -> cached_failure(cached_error, error)
          {:error, error} -> {:error, error}
        end
    end
  end

  defp cached_failure(cached_error, download_error) do
    {:error, {:cached_and_download_failed, cached_error, download_error}}
  end

  defp download(request, checksums) do
    url = url(request.base_url, request.tarball)

    with {:ok, content} <- Download.get(url, Map.get(request, :download, [])),
         :ok <- verify(request, content, checksums),
         :ok <- cache(content, request) do
      {:ok, content}
    end
  end

  defp verify(request, content, checksums) do
    Checksum.verify(request.tarball, content, checksums, request.checksum_file)
  end

  # The download has verified, so a cache that cannot be written (a read-only home, say) only
  # costs the next build another download: say so, and go on.
  defp cache(_content, %{cache_dir: nil}), do: :ok

  defp cache(content, request) do
    case AtomicFile.write(Path.join(request.cache_dir, request.tarball), content) do
      :ok ->
        :ok

      {:error, {:write_failed, path, reason}} ->
        Mix.shell().info(
          "macula_quic: could not cache #{path} (#{inspect(reason)}); installing anyway. " <>
            "Set MACULA_QUIC_CACHE_DIR to a writable directory to keep downloads."
        )

        :ok
    end
  end

  # Extracts in memory and takes only the expected member, so a hostile archive can neither
  # write outside priv/native nor smuggle in extra files.
  defp extract(tarball, request) do
    case :erl_tar.extract({:binary, tarball}, [:compressed, :memory]) do
      {:ok, members} -> find_member(members, request)
      {:error, reason} -> {:error, {:bad_tarball, request.tarball, reason}}
    end
  end

  defp find_member(members, request) do
    wanted = String.to_charlist(request.file_name)

    case List.keyfind(members, wanted, 0) do
      {_, library} ->
        {:ok, library}

      nil ->
        names = Enum.map(members, fn {name, _} -> List.to_string(name) end)
        {:error, {:bad_tarball, request.tarball, {:member_missing, request.file_name, names}}}
    end
  end

  defp place(library, request) do
    destination = Path.join(request.native_dir, request.file_name)

    with :ok <- AtomicFile.write(destination, library) do
      {:ok, destination}
    end
  end
end
