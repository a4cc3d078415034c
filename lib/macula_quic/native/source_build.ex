defmodule MaculaQuic.Native.SourceBuild do
  @moduledoc false
  # Builds the NIF from source with cargo and copies it into priv/native. Internal to the
  # loader; options are explicit so it can be exercised without touching the environment.
  #
  # Cargo's target dir is pinned to native/macula_quic/target (even if CARGO_TARGET_DIR is
  # set) so dev and test builds share one cache and the library is found where we look.
  # The library is placed as priv/native/libmacula_quic.<so|dll>: cargo's .dylib on macOS
  # becomes .so, because :erlang.load_nif/2 appends ".so" on every Unix. A build with extra
  # crate features (the test build's test_hooks) gets its own name,
  # libmacula_quic-<features>.<so|dll>: in a project checkout every Mix env shares one priv/
  # (Mix symlinks it), so a prod build (bin/demo) must not replace the test build's library
  # behind the test env's back, nor the reverse.

  alias MaculaQuic.Native.AtomicFile

  @crate "macula_quic"

  @type request :: %{
          required(:crate_dir) => Path.t(),
          required(:native_dir) => Path.t(),
          optional(:cargo) => String.t(),
          optional(:features) => [String.t()],
          optional(:os_type) => {atom(), atom()},
          optional(:into) => Collectable.t()
        }

  @type error ::
          {:cargo_missing, String.t()}
          | {:cargo_failed, non_neg_integer()}
          | {:library_missing, Path.t()}
          | AtomicFile.error()

  @doc """
  The library's load path relative to the priv dir (no extension): what a source build
  produces.
  """
  @spec lib_path([String.t()]) :: String.t()
  def lib_path(features \\ []), do: "native/lib#{@crate}#{suffix(features)}"

  @doc """
  Runs `cargo build --release` in `crate_dir` (output streamed to `into`, stdout by default)
  and copies the library into `native_dir`. Returns the placed file's path.
  """
  @spec build(request()) :: {:ok, Path.t()} | {:error, error()}
  def build(request) do
    os_type = Map.get(request, :os_type, :os.type())

    with {:ok, cargo} <- find_cargo(Map.get(request, :cargo, "cargo")),
         :ok <- run_cargo(cargo, request) do
      copy_library(request, os_type)
    end
  end

  @doc """
  The file cargo produces for this crate on `os_type`, and the name it gets in priv/native
  when built with the crate `features`.
  """
  @spec library_names({atom(), atom()}, [String.t()]) ::
          {built :: String.t(), placed :: String.t()}
  def library_names(os_type, features \\ [])

  def library_names({:win32, _}, features),
    do: {"#{@crate}.dll", "lib#{@crate}#{suffix(features)}.dll"}

  def library_names({:unix, :darwin}, features),
    do: {"lib#{@crate}.dylib", "lib#{@crate}#{suffix(features)}.so"}

  def library_names({:unix, _}, features),
    do: {"lib#{@crate}.so", "lib#{@crate}#{suffix(features)}.so"}

  defp suffix([]), do: ""
  defp suffix(features), do: "-" <> (features |> Enum.sort() |> Enum.join("-"))

  @doc """
  The arguments given to cargo.
  """
  @spec cargo_args(request()) :: [String.t()]
  def cargo_args(request) do
    features =
      case Map.get(request, :features, []) do
        [] -> []
        list -> ["--features", Enum.join(list, ",")]
      end

    [
      "build",
      "--release",
      "--manifest-path",
      manifest(request),
      "--target-dir",
      target_dir(request)
    ] ++
      features
  end

  defp find_cargo(cargo) do
    case System.find_executable(cargo) do
      nil -> {:error, {:cargo_missing, cargo}}
      path -> {:ok, path}
    end
  end

  defp run_cargo(cargo, request) do
    into = Map.get(request, :into, IO.stream(:stdio, :line))
    args = cargo_args(request)

    case System.cmd(cargo, args, into: into, stderr_to_stdout: true, cd: request.crate_dir) do
      {_, 0} -> :ok
      {_, status} -> {:error, {:cargo_failed, status}}
    end
  end

  defp copy_library(request, os_type) do
    {built, placed} = library_names(os_type, Map.get(request, :features, []))
    source = Path.join([target_dir(request), "release", built])
    destination = Path.join(request.native_dir, placed)

    if File.regular?(source) do
      copy_atomically(source, destination)
    else
      {:error, {:library_missing, source}}
    end
  end

  # Written beside the destination and renamed over it (see `AtomicFile`): overwriting the
  # file in place could corrupt the code of a running VM that has the previous build loaded.
  defp copy_atomically(source, destination) do
    with {:ok, library} <- read(source),
         :ok <- AtomicFile.write(destination, library) do
      {:ok, destination}
    end
  end

  defp read(source) do
    case File.read(source) do
      {:ok, library} -> {:ok, library}
      {:error, _} -> {:error, {:library_missing, source}}
    end
  end

  defp manifest(request), do: Path.join(request.crate_dir, "Cargo.toml")
  defp target_dir(request), do: Path.join(request.crate_dir, "target")
end
