defmodule MaculaQuic.Native.TargetTest do
  use ExUnit.Case, async: true

  alias MaculaQuic.Native.Target

  defp host(arch, overrides) do
    Map.merge(
      %{
        system_architecture: arch,
        os_type: {:unix, :linux},
        wordsize: 8,
        nif_version: "2.16",
        env: %{}
      },
      Map.new(overrides)
    )
  end

  describe "triple/1" do
    for {arch, os_type, expected} <- [
          {"x86_64-pc-linux-gnu", {:unix, :linux}, "x86_64-unknown-linux-gnu"},
          {"aarch64-unknown-linux-gnu", {:unix, :linux}, "aarch64-unknown-linux-gnu"},
          {"x86_64-alpine-linux-musl", {:unix, :linux}, "x86_64-unknown-linux-musl"},
          {"aarch64-alpine-linux-musl", {:unix, :linux}, "aarch64-unknown-linux-musl"},
          {"x86_64-redhat-linux-gnu", {:unix, :linux}, "x86_64-unknown-linux-gnu"},
          {"x86_64-suse-linux-gnu", {:unix, :linux}, "x86_64-unknown-linux-gnu"},
          {"x86_64-amazon-linux-gnu", {:unix, :linux}, "x86_64-unknown-linux-gnu"},
          {"aarch64-amazon-linux-gnu", {:unix, :linux}, "aarch64-unknown-linux-gnu"},
          {"x86_64-linux-gnu", {:unix, :linux}, "x86_64-unknown-linux-gnu"},
          {"aarch64-linux-musl", {:unix, :linux}, "aarch64-unknown-linux-musl"},
          {"arm64-unknown-linux-gnu", {:unix, :linux}, "aarch64-unknown-linux-gnu"},
          {"arm64-apple-darwin23.0.0", {:unix, :darwin}, "aarch64-apple-darwin"},
          {"amd64-pc-linux-gnu", {:unix, :linux}, "x86_64-unknown-linux-gnu"},
          {"riscv64-unknown-linux-gnu", {:unix, :linux}, "riscv64gc-unknown-linux-gnu"},
          {"arm-unknown-linux-gnueabihf", {:unix, :linux}, "arm-unknown-linux-gnueabihf"},
          {"aarch64-apple-darwin23.1.0", {:unix, :darwin}, "aarch64-apple-darwin"},
          {"x86_64-apple-darwin21.6.0", {:unix, :darwin}, "x86_64-apple-darwin"},
          {"arm-apple-darwin22.4.0", {:unix, :darwin}, "aarch64-apple-darwin"},
          {"amd64-portbld-freebsd", {:unix, :freebsd}, "x86_64-unknown-freebsd"},
          {"amd64-portbld-freebsd13.2", {:unix, :freebsd}, "x86_64-unknown-freebsd"},
          {"win32", {:win32, :nt}, "x86_64-pc-windows-msvc"}
        ] do
      test "#{arch} -> #{expected}" do
        assert Target.triple(host(unquote(arch), os_type: unquote(Macro.escape(os_type)))) ==
                 unquote(expected)
      end
    end

    test "32-bit Windows is i686" do
      assert Target.triple(host("win32", os_type: {:win32, :nt}, wordsize: 4)) ==
               "i686-pc-windows-msvc"
    end

    test "windows-gnu only through TARGET_ABI" do
      env = %{"TARGET_ABI" => "gnu"}

      assert Target.triple(host("win32", os_type: {:win32, :nt}, env: env)) ==
               "x86_64-pc-windows-gnu"
    end

    test "a complete TARGET_* Windows triple that we ship is taken as is" do
      env = %{
        "TARGET_ARCH" => "x86_64",
        "TARGET_VENDOR" => "pc",
        "TARGET_OS" => "windows",
        "TARGET_ABI" => "gnu"
      }

      assert Target.triple(host("win32", os_type: {:win32, :nt}, env: env)) ==
               "x86_64-pc-windows-gnu"
    end

    test "TARGET_* overrides (Nerves) replace parts; a kept vendor on linux becomes unknown" do
      env = %{"TARGET_ARCH" => "aarch64", "TARGET_OS" => "linux", "TARGET_ABI" => "musl"}

      assert Target.triple(host("x86_64-apple-darwin21.6.0", env: env)) ==
               "aarch64-unknown-linux-musl"

      assert Target.triple(host("x86_64-pc-linux-gnu", env: %{"TARGET_ABI" => "musl"})) ==
               "x86_64-unknown-linux-musl"
    end

    test "a distribution's vendor given by TARGET_VENDOR is unknown all the same" do
      env = %{"TARGET_VENDOR" => "pc"}

      assert Target.triple(host("x86_64-pc-linux-gnu", env: env)) ==
               "x86_64-unknown-linux-gnu"
    end

    test "TARGET_VENDOR is kept when set" do
      env = %{"TARGET_ARCH" => "armv7", "TARGET_VENDOR" => "nerves", "TARGET_ABI" => "gnueabihf"}

      assert Target.triple(host("x86_64-pc-linux-gnu", env: env)) ==
               "armv7-nerves-linux-gnueabihf"
    end

    test "empty TARGET_* values are ignored" do
      assert Target.triple(host("x86_64-pc-linux-gnu", env: %{"TARGET_ARCH" => ""})) ==
               "x86_64-unknown-linux-gnu"
    end
  end

  describe "nif_version/2" do
    test "exact match" do
      assert Target.nif_version("2.16", ["2.15", "2.16", "2.17"]) == {:ok, "2.16"}
    end

    test "the highest same-major version not above the VM's" do
      assert Target.nif_version("2.16", ["2.15"]) == {:ok, "2.15"}
      assert Target.nif_version("2.18", ["2.15", "2.16", "2.17"]) == {:ok, "2.17"}
      assert Target.nif_version("2.18", ["2.17", "2.15", "2.16"]) == {:ok, "2.17"}
    end

    test "a version of another shape matches nothing, and raises nothing" do
      assert Target.nif_version("3.0.1", ["2.15", "2.16", "2.17"]) ==
               {:error, {:unsupported_nif_version, "3.0.1", ["2.15", "2.16", "2.17"]}}

      assert Target.nif_version("2.17.1", ["2.16", "2.17"]) == {:ok, "2.17"}
      assert {:error, _} = Target.nif_version("x", ["2.16"])
    end

    test "nothing compatible" do
      assert Target.nif_version("3.0", ["2.15", "2.16", "2.17"]) ==
               {:error, {:unsupported_nif_version, "3.0", ["2.15", "2.16", "2.17"]}}

      assert {:error, {:unsupported_nif_version, "2.14", _}} = Target.nif_version("2.14")
    end
  end

  describe "resolve/3" do
    test "a supported host" do
      assert Target.resolve(host("x86_64-pc-linux-gnu", nif_version: "2.18")) ==
               {:ok, %{target: "x86_64-unknown-linux-gnu", nif_version: "2.17"}}
    end

    test "an unsupported target" do
      assert {:error, {:unsupported_target, "x86_64-unknown-freebsd", targets}} =
               Target.resolve(host("amd64-portbld-freebsd", os_type: {:unix, :freebsd}))

      assert targets == Target.targets()
    end

    test "an unsupported NIF version" do
      assert {:error, {:unsupported_nif_version, "3.0", _}} =
               Target.resolve(host("x86_64-pc-linux-gnu", nif_version: "3.0"))
    end

    test "this VM resolves (CI runs on shipped targets)" do
      assert {:ok, %{target: target, nif_version: nif}} = Target.resolve(Target.host())
      assert target in Target.targets()
      assert nif in Target.nif_versions()
    end
  end

  test "what we ship" do
    assert Target.nif_versions() == ["2.15", "2.16", "2.17"]
    assert length(Target.targets()) == 8
    assert Enum.sort(Target.targets()) == Target.targets()
  end
end
