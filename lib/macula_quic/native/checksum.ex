defmodule MaculaQuic.Native.Checksum do
  @moduledoc false
  # The checksum file, checksum-Elixir.MaculaQuic.Native.exs in the project root, shipped in
  # the Hex package. Internal to the loader and `mix macula_quic.checksum`; its format is
  # RustlerPrecompiled's, byte for byte:
  #
  #   %{
  #     "libmacula_quic-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu.so.tar.gz" => "sha256:<hex>",
  #   }
  #
  # The hash is over the .tar.gz. The file is *parsed* as a literal, never evaluated: it comes
  # with the package, and reading it must not run code.

  @file_name "checksum-Elixir.MaculaQuic.Native.exs"

  @type checksums :: %{optional(String.t()) => String.t()}
  @type error ::
          {:checksum_file_unreadable, Path.t(), term()}
          | {:checksum_file_invalid, Path.t()}
          | {:checksum_missing, String.t(), Path.t()}
          | {:checksum_mismatch, String.t(), String.t(), String.t()}

  @doc """
  The checksum file's path in `project_dir`.
  """
  @spec path(Path.t()) :: Path.t()
  def path(project_dir), do: Path.join(project_dir, @file_name)

  @doc """
  `"sha256:<lowercase hex>"` of `content`.
  """
  @spec sha256(iodata()) :: String.t()
  def sha256(content), do: "sha256:" <> hex_sha256(content)

  @doc """
  The bare lowercase hex SHA-256 of `content` (as `sha256sum` prints it).
  """
  @spec hex_sha256(iodata()) :: String.t()
  def hex_sha256(content), do: :crypto.hash(:sha256, content) |> Base.encode16(case: :lower)

  @doc """
  Reads the checksum map from `path`, accepting only a literal map of strings to strings.
  """
  @spec read(Path.t()) :: {:ok, checksums()} | {:error, error()}
  def read(path) do
    with {:ok, text} <- read_text(path),
         {:ok, quoted} <- parse(text, path) do
      literal_map(quoted, path)
    end
  end

  @doc """
  Checks `content` (the tarball named `name`) against the entry for `name` in the checksum
  file at `path` (already read into `checksums`).
  """
  @spec verify(String.t(), binary(), checksums(), Path.t()) :: :ok | {:error, error()}
  def verify(name, content, checksums, path) do
    case Map.fetch(checksums, name) do
      {:ok, expected} -> compare(name, expected, sha256(content))
      :error -> {:error, {:checksum_missing, name, path}}
    end
  end

  @doc """
  The file's text for `checksums`: a sorted map literal, one entry per line.
  """
  @spec format(checksums()) :: String.t()
  def format(checksums) do
    lines =
      checksums
      |> Enum.sort()
      |> Enum.map(fn {name, sum} -> "  #{inspect(name)} => #{inspect(sum)},\n" end)

    IO.iodata_to_binary(["%{\n", lines, "}\n"])
  end

  @doc """
  Writes `checksums` to `path` in `format/1`'s format.
  """
  @spec write(Path.t(), checksums()) :: :ok | {:error, File.posix()}
  def write(path, checksums), do: File.write(path, format(checksums))

  defp compare(_name, same, same), do: :ok
  defp compare(name, expected, actual), do: {:error, {:checksum_mismatch, name, expected, actual}}

  defp read_text(path) do
    case File.read(path) do
      {:ok, text} -> {:ok, text}
      {:error, reason} -> {:error, {:checksum_file_unreadable, path, reason}}
    end
  end

  defp parse(text, path) do
    case Code.string_to_quoted(text) do
      {:ok, quoted} -> {:ok, quoted}
      {:error, _} -> {:error, {:checksum_file_invalid, path}}
    end
  end

  defp literal_map({:%{}, _meta, pairs}, path) when is_list(pairs) do
    if Enum.all?(pairs, &string_pair?/1),
      do: {:ok, Map.new(pairs)},
      else: {:error, {:checksum_file_invalid, path}}
  end

  defp literal_map(_other, path), do: {:error, {:checksum_file_invalid, path}}

  defp string_pair?({key, value}), do: is_binary(key) and is_binary(value)
  defp string_pair?(_), do: false
end
