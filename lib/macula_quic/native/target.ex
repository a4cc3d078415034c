defmodule MaculaQuic.Native.Target do
  @moduledoc false
  # Which precompiled library this VM needs: the Rust target triple and the NIF version.
  #
  # Internal to the loader (hence @moduledoc false), but the *rules* are a public contract:
  # they follow RustlerPrecompiled's, so release tarballs built by
  # philss/rustler-precompiled-action are found under the names users of other
  # Rustler-based packages expect. Every function except `host/0` is pure (the VM facts and
  # the environment are arguments), so the rules are tested on tables of examples without
  # touching the process environment.
  #
  # This module is also the ONE place that lists what we ship: `targets/0` and
  # `nif_versions/0` drive the loader, the checksum task, and must match the matrix in
  # .github/workflows/release.yml.

  @targets ~w(
    aarch64-apple-darwin
    aarch64-unknown-linux-gnu
    aarch64-unknown-linux-musl
    x86_64-apple-darwin
    x86_64-pc-windows-gnu
    x86_64-pc-windows-msvc
    x86_64-unknown-linux-gnu
    x86_64-unknown-linux-musl
  )

  @nif_versions ~w(2.15 2.16 2.17)

  @override_vars [
    arch: "TARGET_ARCH",
    vendor: "TARGET_VENDOR",
    os: "TARGET_OS",
    abi: "TARGET_ABI"
  ]

  @typedoc "Facts about the running VM that decide the target (see `host/0`)."
  @type host :: %{
          system_architecture: String.t(),
          os_type: {atom(), atom()},
          wordsize: pos_integer(),
          nif_version: String.t(),
          env: %{optional(String.t()) => String.t()}
        }

  @doc """
  The Rust target triples we publish precompiled libraries for.
  """
  @spec targets() :: [String.t()]
  def targets, do: @targets

  @doc """
  The NIF versions we publish (crate features nif_version_2_15 .. nif_version_2_17).
  """
  @spec nif_versions() :: [String.t()]
  def nif_versions, do: @nif_versions

  @doc """
  The only impure function: reads the running VM and the OS environment.
  """
  @spec host() :: host()
  def host do
    %{
      system_architecture: List.to_string(:erlang.system_info(:system_architecture)),
      os_type: :os.type(),
      wordsize: :erlang.system_info(:wordsize),
      nif_version: List.to_string(:erlang.system_info(:nif_version)),
      env: System.get_env()
    }
  end

  @doc """
  Target triple and NIF version for `host`, checked against what we ship.
  """
  @spec resolve(host(), [String.t()], [String.t()]) ::
          {:ok, %{target: String.t(), nif_version: String.t()}}
          | {:error, {:unsupported_target, String.t(), [String.t()]}}
          | {:error, {:unsupported_nif_version, String.t(), [String.t()]}}
  def resolve(host, targets \\ @targets, nif_versions \\ @nif_versions) do
    triple = triple(host, targets)

    with :ok <- supported_target(triple, targets),
         {:ok, nif} <- nif_version(host.nif_version, nif_versions) do
      {:ok, %{target: triple, nif_version: nif}}
    end
  end

  @doc """
  The Rust target triple for `host`. `known_targets` only matters on Windows, where a
  TARGET_* override is taken as is when it names a known target.
  """
  @spec triple(host(), [String.t()]) :: String.t()
  def triple(host, known_targets \\ @targets)

  def triple(%{os_type: {:win32, _}} = host, known_targets) do
    parts = host.system_architecture |> split_architecture() |> apply_overrides(host.env)
    overridden = join(parts)

    if overridden in known_targets do
      overridden
    else
      parts
      |> Map.put_new(:arch, windows_arch(host.wordsize))
      |> Map.put_new(:vendor, "pc")
      |> Map.put_new(:os, "windows")
      |> Map.put_new(:abi, "msvc")
      |> join()
    end
  end

  def triple(host, _known_targets) do
    host.system_architecture
    |> split_architecture()
    |> apply_overrides(host.env)
    |> normalize(vendor_given?(host.env))
    |> join()
  end

  @doc """
  The NIF version to download for a VM speaking `current`: an exact match, else the
  highest available one with the same major and a minor <= the VM's (NIFs are backwards
  compatible within a major version).
  """
  @spec nif_version(String.t(), [String.t()]) ::
          {:ok, String.t()} | {:error, {:unsupported_nif_version, String.t(), [String.t()]}}
  def nif_version(current, available \\ @nif_versions) do
    if current in available do
      {:ok, current}
    else
      {major, minor} = parse_nif_version(current)

      available
      |> Enum.map(&{&1, parse_nif_version(&1)})
      |> Enum.filter(fn {_, {ma, mi}} -> is_integer(ma) and ma == major and mi <= minor end)
      |> Enum.max_by(fn {_, {_, mi}} -> mi end, fn -> nil end)
      |> case do
        {version, _} -> {:ok, version}
        nil -> {:error, {:unsupported_nif_version, current, available}}
      end
    end
  end

  defp supported_target(triple, targets) do
    if triple in targets, do: :ok, else: {:error, {:unsupported_target, triple, targets}}
  end

  # "2.16" -> {2, 16} (and "2.17.1" -> {2, 17}); anything else, "x" say, matches nothing.
  defp parse_nif_version(version) do
    with [major, minor | _] <- String.split(version, "."),
         {major, ""} <- Integer.parse(major),
         {minor, ""} <- Integer.parse(minor) do
      {major, minor}
    else
      _ -> {nil, nil}
    end
  end

  # "x86_64-pc-linux-gnu" -> %{arch, vendor, os, abi}; three parts have no ABI, but for a
  # vendorless Linux triple ("x86_64-linux-gnu", as some builds of Erlang report it); any
  # other shape (Windows reports "win32") gives no parts at all.
  defp split_architecture(system_architecture) do
    case String.split(system_architecture, "-") do
      [arch, vendor, os, abi] -> %{arch: arch, vendor: vendor, os: os, abi: abi}
      [arch, "linux", abi] -> %{arch: arch, vendor: "unknown", os: "linux", abi: abi}
      [arch, vendor, os] -> %{arch: arch, vendor: vendor, os: os}
      _ -> %{}
    end
  end

  # TARGET_ARCH/VENDOR/OS/ABI (as set by Nerves for cross builds) replace parts. A Linux
  # target whose parts were overridden but whose vendor was not gets the vendor "unknown".
  defp apply_overrides(parts, env) do
    overridden =
      Enum.reduce(@override_vars, parts, fn {key, var}, acc ->
        case Map.get(env, var) do
          value when is_binary(value) and value != "" -> Map.put(acc, key, value)
          _ -> acc
        end
      end)

    if overridden != parts and overridden[:vendor] == parts[:vendor] and
         overridden[:os] == "linux" do
      Map.put(overridden, :vendor, "unknown")
    else
      overridden
    end
  end

  defp vendor_given?(env), do: Map.get(env, "TARGET_VENDOR") not in [nil, ""]

  defp normalize(%{os: os} = parts, vendor_given?) do
    cond do
      os =~ "darwin" -> normalize_darwin(parts)
      os =~ "linux" -> normalize_linux(parts, vendor_given?)
      os =~ "freebsd" -> normalize_freebsd(parts)
      true -> parts
    end
  end

  defp normalize(parts, _vendor_given?), do: parts

  # "aarch64-apple-darwin23.1.0" -> "aarch64-apple-darwin"; Apple silicon may also be
  # reported as arm (old VMs) or arm64.
  defp normalize_darwin(parts) do
    arch = if parts.arch in ["arm", "arm64"], do: "aarch64", else: parts.arch
    %{parts | arch: arch, os: "darwin"}
  end

  # A distribution's vendor (pc, redhat, suse, alpine, amazon, ...) is "unknown" in Rust's
  # Linux triples; a vendor TARGET_VENDOR asks for is kept (Nerves), but for those four, which
  # RustlerPrecompiled maps to "unknown" even then. The ABI part (gnu, musl, gnueabihf) is
  # kept, which is how musl systems are recognised. (RustlerPrecompiled maps only its list of
  # vendors, and a Linux with another one, such as Amazon Linux's Erlang, then found no
  # precompiled NIF.)
  defp normalize_linux(parts, vendor_given?) do
    vendor =
      if vendor_given? and parts.vendor not in ~w(pc redhat suse alpine),
        do: parts.vendor,
        else: "unknown"

    %{parts | arch: normalize_arch(parts.arch), vendor: vendor}
  end

  # "amd64-portbld-freebsd13.2" -> "x86_64-unknown-freebsd" (Rust triples carry no OS release).
  defp normalize_freebsd(parts) do
    vendor = if parts.vendor == "portbld", do: "unknown", else: parts.vendor
    %{parts | arch: normalize_arch(parts.arch), vendor: vendor, os: "freebsd"}
  end

  defp normalize_arch("amd64"), do: "x86_64"
  defp normalize_arch("arm64"), do: "aarch64"
  defp normalize_arch("riscv64"), do: "riscv64gc"
  defp normalize_arch(arch), do: arch

  defp windows_arch(4), do: "i686"
  defp windows_arch(8), do: "x86_64"
  defp windows_arch(_), do: "unknown"

  defp join(parts) do
    [:arch, :vendor, :os, :abi]
    |> Enum.map(&Map.get(parts, &1))
    |> Enum.reject(&is_nil/1)
    |> Enum.join("-")
  end
end
