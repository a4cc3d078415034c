defmodule MaculaQuic.Native.ChecksumTaskTest do
  # `mix macula_quic.checksum` on directories of real tarballs, and over a local HTTP server.
  # Not async: the task reports through Mix.shell(), which these tests redirect.
  use ExUnit.Case, async: false

  alias MaculaQuic.{LoaderFixtures, LoaderHttpServer}
  alias MaculaQuic.Native.{Artifact, Checksum, Target}
  alias Mix.Tasks.MaculaQuic.Checksum, as: Task

  @moduletag :tmp_dir
  @version "0.3.0"

  setup %{tmp_dir: dir} do
    shell = Mix.shell()
    Mix.shell(Mix.Shell.Process)
    on_exit(fn -> Mix.shell(shell) end)

    www = Path.join(dir, "www")
    File.mkdir_p!(www)
    %{www: www, out: Path.join(dir, "checksum-Elixir.MaculaQuic.Native.exs")}
  end

  # A real tarball for every target x NIF version; each holds distinct bytes.
  defp all_tarballs!(www) do
    for target <- Target.targets(), nif <- Target.nif_versions(), into: %{} do
      file = Artifact.file_name(@version, nif, target)
      content = LoaderFixtures.tarball!(www, file, "library #{nif} #{target}")
      {file <> ".tar.gz", Checksum.sha256(content)}
    end
  end

  defp run_task(args), do: Task.run(args ++ ["--version", @version])

  test "--all over a directory writes every checksum in the RustlerPrecompiled format", ctx do
    expected = all_tarballs!(ctx.www)
    run_task(["--all", "--dir", ctx.www, "--checksum-file", ctx.out])

    assert map_size(expected) == 24
    assert Checksum.read(ctx.out) == {:ok, expected}

    text = File.read!(ctx.out)
    assert text == Checksum.format(expected)
    lines = String.split(text, "\n", trim: true)
    assert hd(lines) == "%{"
    assert List.last(lines) == "}"
    entries = lines |> Enum.drop(1) |> Enum.drop(-1)
    assert entries == Enum.sort(entries)

    assert Enum.all?(
             entries,
             &Regex.match?(~r/^  "[^"]+\.tar\.gz" => "sha256:[0-9a-f]{64}",$/, &1)
           )

    assert_received {:mix_shell, :info, ["Wrote 24 checksum(s) to " <> _]}
  end

  test "--print prints sha256sum-style lines", ctx do
    expected = all_tarballs!(ctx.www)
    run_task(["--all", "--print", "--dir", ctx.www, "--checksum-file", ctx.out])

    for {name, "sha256:" <> hex} <- expected do
      line = "#{hex}  #{name}"
      assert_received {:mix_shell, :info, [^line]}
    end
  end

  test "works on the real built library", ctx do
    file = Artifact.file_name(@version, "2.16", "x86_64-unknown-linux-gnu")
    tarball = LoaderFixtures.tarball!(ctx.www, file, LoaderFixtures.built_library!())

    run_task(["--all", "--ignore-unavailable", "--dir", ctx.www, "--checksum-file", ctx.out])
    assert Checksum.read(ctx.out) == {:ok, %{(file <> ".tar.gz") => Checksum.sha256(tarball)}}
  end

  test "missing artifacts fail the task, listing them", ctx do
    LoaderFixtures.tarball!(
      ctx.www,
      Artifact.file_name(@version, "2.15", "x86_64-apple-darwin"),
      "x"
    )

    error =
      assert_raise Mix.Error, fn ->
        run_task(["--all", "--dir", ctx.www, "--checksum-file", ctx.out])
      end

    assert error.message =~ "23 artifact(s) not available"
    assert error.message =~ "--ignore-unavailable"
    refute File.exists?(ctx.out)
  end

  test "--ignore-unavailable keeps what exists", ctx do
    file = Artifact.file_name(@version, "2.15", "x86_64-apple-darwin")
    content = LoaderFixtures.tarball!(ctx.www, file, "x")

    run_task(["--all", "--ignore-unavailable", "--dir", ctx.www, "--checksum-file", ctx.out])
    assert Checksum.read(ctx.out) == {:ok, %{(file <> ".tar.gz") => Checksum.sha256(content)}}
  end

  test "--only-local takes only this machine's artifact", ctx do
    expected = all_tarballs!(ctx.www)
    {:ok, %{target: target, nif_version: nif}} = Target.resolve(Target.host())
    name = Artifact.tarball_name(@version, nif, target)

    run_task(["--only-local", "--dir", ctx.www, "--checksum-file", ctx.out])
    assert Checksum.read(ctx.out) == {:ok, Map.take(expected, [name])}
  end

  test "a tarball without its library is refused", ctx do
    tarball = LoaderFixtures.tarball!(ctx.www, "libwrong.so", "x")
    name = Artifact.tarball_name(@version, "2.16", "aarch64-apple-darwin")
    File.write!(Path.join(ctx.www, name), tarball)

    error =
      assert_raise Mix.Error, fn ->
        run_task(["--all", "--ignore-unavailable", "--dir", ctx.www, "--checksum-file", ctx.out])
      end

    assert error.message =~ "#{name} is not a valid NIF tarball"
    refute File.exists?(ctx.out)
  end

  test "needs --all or --only-local", ctx do
    assert_raise Mix.Error, ~r/--all/, fn -> run_task(["--dir", ctx.www]) end
  end

  describe "--check" do
    test "passes a file with every artifact of the version, and writes nothing", ctx do
      expected = all_tarballs!(ctx.www)
      :ok = Checksum.write(ctx.out, expected)
      before = File.read!(ctx.out)
      assert :ok = run_task(["--check", "--checksum-file", ctx.out])
      assert File.read!(ctx.out) == before
      assert_received {:mix_shell, :info, [message]}
      assert message =~ "lists the 24 artifacts of 0.3.0"
    end

    test "fails an empty, partial, foreign or malformed file, saying what is wrong", ctx do
      all = all_tarballs!(ctx.www)
      [first, second | _] = all |> Map.keys() |> Enum.sort()
      other = String.replace(first, @version, "0.2.9")

      for {checksums, wanted} <- [
            {%{}, "missing: #{first}"},
            {Map.delete(all, second), "missing: #{second}"},
            {Map.put(all, other, all[first]), "not an artifact of this version: #{other}"},
            {%{all | first => "sha256:abc"}, "not a SHA-256: #{first}"}
          ] do
        :ok = Checksum.write(ctx.out, checksums)

        error =
          assert_raise Mix.Error, fn -> run_task(["--check", "--checksum-file", ctx.out]) end

        assert error.message =~ wanted
        assert error.message =~ "mix macula_quic.checksum --all"
      end
    end

    test "a -dev version needs no checksums", ctx do
      :ok = Checksum.write(ctx.out, %{})

      assert :ok = Task.run(["--check", "--checksum-file", ctx.out, "--version", "0.3.1-dev"])

      assert_received {:mix_shell, :info, [message]}
      assert message =~ "development version"
    end

    test "mix hex.publish checks the checksum file first" do
      assert Mix.Project.config()[:aliases][:"hex.publish"] == [
               "macula_quic.checksum --check",
               "hex.publish"
             ]
    end
  end

  describe "over HTTP" do
    @describetag :loader_network

    setup %{www: www} do
      server = LoaderHttpServer.start!(www)
      on_exit(fn -> LoaderHttpServer.stop(server) end)
      %{server: server}
    end

    test "--all from a base URL", ctx do
      expected = all_tarballs!(ctx.www)
      run_task(["--all", "--base-url", ctx.server.base_url, "--checksum-file", ctx.out])
      assert Checksum.read(ctx.out) == {:ok, expected}
    end

    test "404s are unavailable artifacts", ctx do
      file = Artifact.file_name(@version, "2.17", "aarch64-unknown-linux-musl")
      content = LoaderFixtures.tarball!(ctx.www, file, "musl")

      error =
        assert_raise Mix.Error, fn ->
          run_task(["--all", "--base-url", ctx.server.base_url, "--checksum-file", ctx.out])
        end

      assert error.message =~ "23 artifact(s) not available"
      assert error.message =~ ctx.server.base_url

      run_task([
        "--all",
        "--ignore-unavailable",
        "--base-url",
        ctx.server.base_url,
        "--checksum-file",
        ctx.out
      ])

      assert Checksum.read(ctx.out) == {:ok, %{(file <> ".tar.gz") => Checksum.sha256(content)}}
    end

    test "a server that is gone fails the task", ctx do
      LoaderHttpServer.stop(ctx.server)

      assert_raise Mix.Error, ~r/could not download/, fn ->
        run_task([
          "--all",
          "--base-url",
          ctx.server.base_url,
          "--max-retries",
          "0",
          "--checksum-file",
          ctx.out
        ])
      end
    end
  end
end
