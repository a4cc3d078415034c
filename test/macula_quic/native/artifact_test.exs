defmodule MaculaQuic.Native.ArtifactTest do
  use ExUnit.Case, async: true

  alias MaculaQuic.Native.Artifact

  test "linux" do
    assert Artifact.tarball_name("0.1.0", "2.16", "x86_64-unknown-linux-gnu") ==
             "libmacula_quic-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu.so.tar.gz"

    assert Artifact.file_name("0.1.0", "2.15", "aarch64-unknown-linux-musl") ==
             "libmacula_quic-v0.1.0-nif-2.15-aarch64-unknown-linux-musl.so"

    assert Artifact.lib_name("0.1.0", "2.15", "aarch64-unknown-linux-musl") ==
             "libmacula_quic-v0.1.0-nif-2.15-aarch64-unknown-linux-musl"
  end

  test "macOS uses .so too" do
    assert Artifact.tarball_name("0.2.0", "2.17", "aarch64-apple-darwin") ==
             "libmacula_quic-v0.2.0-nif-2.17-aarch64-apple-darwin.so.tar.gz"
  end

  test "windows drops the lib prefix and uses .dll" do
    assert Artifact.tarball_name("0.1.0", "2.16", "x86_64-pc-windows-msvc") ==
             "macula_quic-v0.1.0-nif-2.16-x86_64-pc-windows-msvc.dll.tar.gz"

    assert Artifact.file_name("0.1.0", "2.15", "x86_64-pc-windows-gnu") ==
             "macula_quic-v0.1.0-nif-2.15-x86_64-pc-windows-gnu.dll"

    assert Artifact.lib_name("0.1.0", "2.15", "x86_64-pc-windows-gnu") ==
             "macula_quic-v0.1.0-nif-2.15-x86_64-pc-windows-gnu"
  end

  test "every target x NIF version, sorted" do
    names = Artifact.all_tarball_names("1.0.0")
    assert length(names) == 24
    assert names == Enum.sort(names)
    assert "libmacula_quic-v1.0.0-nif-2.17-x86_64-unknown-linux-musl.so.tar.gz" in names
    assert "macula_quic-v1.0.0-nif-2.15-x86_64-pc-windows-gnu.dll.tar.gz" in names
  end

  test "default base URL is the GitHub release" do
    assert Artifact.default_base_url("0.3.1") ==
             "https://github.com/macula-io/macula_quic/releases/download/v0.3.1"
  end
end
