defmodule MaculaQuic.Native.AtomicFileTest do
  use ExUnit.Case, async: true

  alias MaculaQuic.Native.AtomicFile

  @moduletag :tmp_dir

  test "writes the whole content, creating the directory, and leaves no temporary file", %{
    tmp_dir: dir
  } do
    path = Path.join([dir, "a", "b", "lib.so"])
    assert :ok = AtomicFile.write(path, ["ab", "cd"])
    assert File.read!(path) == "abcd"
    assert :ok = AtomicFile.write(path, "new")
    assert File.read!(path) == "new"
    assert File.ls!(Path.dirname(path)) == ["lib.so"]
  end

  test "a failure says which path, and leaves the destination as it was", %{tmp_dir: dir} do
    # A directory where the file should go: the rename over it fails.
    path = Path.join(dir, "taken")
    File.mkdir_p!(Path.join(path, "inside"))
    assert {:error, {:write_failed, ^path, _}} = AtomicFile.write(path, "x")
    assert File.ls!(dir) == ["taken"]

    # A file where the directory should be.
    File.write!(Path.join(dir, "file"), "")
    nested = Path.join([dir, "file", "lib.so"])
    assert {:error, {:write_failed, _, _}} = AtomicFile.write(nested, "x")
  end

  test "temporary names differ between VMs, not only within one" do
    name = AtomicFile.temporary_name("/x/lib.so")
    assert String.starts_with?(name, "/x/lib.so.#{System.pid()}.")
    refute name == AtomicFile.temporary_name("/x/lib.so")
  end

  # Two compiles of one project may run at once in separate VMs (an editor's language server
  # and a terminal), both installing the same library. With temporary names from
  # `System.unique_integer/1`, which starts over in each fresh VM, they used the same
  # temporary file and one VM's rename failed (`:enoent`).
  @tag timeout: 120_000
  test "two VMs writing the same file at once both succeed, and the file is whole", %{
    tmp_dir: dir
  } do
    path = Path.join(dir, "lib.so")
    go = Path.join(dir, "go")
    ebin = Mix.Project.compile_path()
    elixir = System.find_executable("elixir")
    parent = self()

    # Each VM says it is up, waits for `go` to appear, then writes 10,000 times: 4 KiB of its
    # own byte. (No message can cross between the VMs and this one; files can.)
    script = fn byte ->
      """
      File.write!(#{inspect(Path.join(dir, "ready"))} <> "#{byte}", "")
      # Bounded: a VM whose test failed before `go` must not poll for ever.
      wait = fn
        _, 0 -> System.halt(1)
        wait, n -> if File.exists?(#{inspect(go)}), do: :ok, else: (Process.sleep(1); wait.(wait, n - 1))
      end
      wait.(wait, 60_000)
      content = :binary.copy(<<#{byte}>>, 4096)
      failures = for _ <- 1..10_000, (r = MaculaQuic.Native.AtomicFile.write(#{inspect(path)}, content)) != :ok, do: r
      IO.puts(inspect(failures))
      """
    end

    for byte <- [1, 2] do
      spawn_link(fn ->
        {out, status} = System.cmd(elixir, ["-pa", ebin, "-e", script.(byte)])
        send(parent, {:vm, byte, status, out})
      end)
    end

    assert {:ok, _} =
             MaculaQuic.Test.Quic.poll_until(
               fn ->
                 if Enum.all?([1, 2], &File.exists?(Path.join(dir, "ready#{&1}"))),
                   do: {:ok, :up},
                   else: {:wait, File.ls!(dir)}
               end,
               10,
               30_000
             )

    File.write!(go, "")

    for byte <- [1, 2] do
      assert_receive {:vm, ^byte, 0, out}, 60_000
      assert String.trim(out) == "[]"
    end

    content = File.read!(path)
    assert content in [:binary.copy(<<1>>, 4096), :binary.copy(<<2>>, 4096)]
    assert Enum.sort(File.ls!(dir)) == ["go", "lib.so", "ready1", "ready2"]
  end
end
