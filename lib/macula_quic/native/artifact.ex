defmodule MaculaQuic.Native.Artifact do
  @moduledoc false
  # File names of precompiled release artifacts. Internal to the loader; the names follow
  # RustlerPrecompiled's convention exactly (philss/rustler-precompiled-action produces them):
  #
  #   libmacula_quic-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu.so.tar.gz
  #   libmacula_quic-v0.1.0-nif-2.16-aarch64-apple-darwin.so.tar.gz   (".so" on macOS too)
  #   macula_quic-v0.1.0-nif-2.16-x86_64-pc-windows-msvc.dll.tar.gz   (no "lib" on Windows)
  #
  # The tarball holds one file, the library under its final name (`file_name/3`).

  alias MaculaQuic.Native.Target

  @crate "macula_quic"

  @doc """
  The crate (and library base) name.
  """
  @spec crate() :: String.t()
  def crate, do: @crate

  @doc """
  The library's name without extension: what `:erlang.load_nif/2` is given (under priv/native).
  """
  @spec lib_name(String.t(), String.t(), String.t()) :: String.t()
  def lib_name(version, nif_version, target) do
    "#{prefix(target)}#{@crate}-v#{version}-nif-#{nif_version}-#{target}"
  end

  @doc """
  The library file inside the tarball: `lib_name/3` plus ".so", or ".dll" on Windows.
  """
  @spec file_name(String.t(), String.t(), String.t()) :: String.t()
  def file_name(version, nif_version, target) do
    "#{lib_name(version, nif_version, target)}.#{extension(target)}"
  end

  @doc """
  The release asset: `file_name/3` plus ".tar.gz". Checksums are taken over this file.
  """
  @spec tarball_name(String.t(), String.t(), String.t()) :: String.t()
  def tarball_name(version, nif_version, target) do
    "#{file_name(version, nif_version, target)}.tar.gz"
  end

  @doc """
  Every tarball a release of `version` ships: all targets x all NIF versions, sorted.
  """
  @spec all_tarball_names(String.t(), [String.t()], [String.t()]) :: [String.t()]
  def all_tarball_names(
        version,
        targets \\ Target.targets(),
        nif_versions \\ Target.nif_versions()
      ) do
    for target <- targets, nif <- nif_versions do
      tarball_name(version, nif, target)
    end
    |> Enum.sort()
  end

  @doc """
  The default download location of a release's assets (its GitHub release page).
  """
  @spec default_base_url(String.t()) :: String.t()
  def default_base_url(version) do
    "https://github.com/macula-io/macula_quic/releases/download/v#{version}"
  end

  defp prefix(target), do: if(windows?(target), do: "", else: "lib")
  defp extension(target), do: if(windows?(target), do: "dll", else: "so")
  defp windows?(target), do: String.contains?(target, "windows")
end
