defmodule MaculaQuic.Native.ChecksumTest do
  use ExUnit.Case, async: true

  alias MaculaQuic.Native.Checksum

  @moduletag :tmp_dir

  test "sha256 is over the given bytes, lowercase hex with the algorithm prefix" do
    assert Checksum.sha256("abc") ==
             "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
  end

  test "format is a sorted map literal, one entry per line" do
    text = Checksum.format(%{"b.tar.gz" => "sha256:02", "a.tar.gz" => "sha256:01"})
    assert text == ~s|%{\n  "a.tar.gz" => "sha256:01",\n  "b.tar.gz" => "sha256:02",\n}\n|
    assert Checksum.format(%{}) == "%{\n}\n"
  end

  test "write then read round-trips", %{tmp_dir: dir} do
    path = Path.join(dir, "checksum.exs")
    sums = %{"x.so.tar.gz" => Checksum.sha256("x"), "y.dll.tar.gz" => Checksum.sha256("y")}
    assert :ok = Checksum.write(path, sums)
    assert Checksum.read(path) == {:ok, sums}
    assert {^sums, []} = Code.eval_file(path)
  end

  test "reads the empty map the repository ships" do
    path = Path.expand("../../../checksum-Elixir.MaculaQuic.Native.exs", __DIR__)
    assert {:ok, map} = Checksum.read(path)
    assert is_map(map)
    assert Checksum.path(Path.dirname(path)) == path
  end

  test "the file is parsed, never evaluated", %{tmp_dir: dir} do
    marker = Path.join(dir, "ran")
    path = Path.join(dir, "evil.exs")
    File.write!(path, ~s|%{"a" => File.write!(#{inspect(marker)}, "x")}|)
    assert Checksum.read(path) == {:error, {:checksum_file_invalid, path}}
    refute File.exists?(marker)

    File.write!(path, "[1, 2]")
    assert Checksum.read(path) == {:error, {:checksum_file_invalid, path}}
    File.write!(path, "%{")
    assert Checksum.read(path) == {:error, {:checksum_file_invalid, path}}
  end

  test "an unreadable file", %{tmp_dir: dir} do
    path = Path.join(dir, "absent.exs")
    assert Checksum.read(path) == {:error, {:checksum_file_unreadable, path, :enoent}}
  end

  test "verify" do
    sums = %{"t.tar.gz" => Checksum.sha256("good")}
    assert :ok = Checksum.verify("t.tar.gz", "good", sums, "f.exs")

    assert Checksum.verify("t.tar.gz", "bad", sums, "f.exs") ==
             {:error,
              {:checksum_mismatch, "t.tar.gz", Checksum.sha256("good"), Checksum.sha256("bad")}}

    assert Checksum.verify("u.tar.gz", "good", sums, "f.exs") ==
             {:error, {:checksum_missing, "u.tar.gz", "f.exs"}}
  end
end
