defmodule MaculaQuic.PackageTest do
  # The Hex package lists its files by name; a name that matches nothing would be left out of
  # the package silently (as LICENSE and include/, with the .hrl README tells Erlang users to
  # include, once were).
  use ExUnit.Case, async: true

  @root Path.expand("..", __DIR__)

  test "every file or directory the package lists exists" do
    files = Mix.Project.config()[:package][:files]
    assert is_list(files) and files != []

    for f <- files do
      assert Path.wildcard(Path.join(@root, f), match_dot: true) != [],
             "package file #{inspect(f)} matches nothing"
    end
  end

  test "the package carries the header Erlang users include, and the license it declares" do
    files = Mix.Project.config()[:package][:files]
    assert "include" in files
    assert File.exists?(Path.join(@root, "include/macula_quic.hrl"))
    assert Mix.Project.config()[:package][:licenses] == ["Apache-2.0"]
    assert File.read!(Path.join(@root, "LICENSE")) =~ "Apache License"
  end

  test "the release workflow builds exactly the targets and NIF versions the loader downloads" do
    # Read with patterns rather than a YAML parser (no dependencies): the matrix's lines.
    workflow = File.read!(Path.join(@root, ".github/workflows/release.yml"))
    targets = Regex.scan(~r/\{ target: ([\w-]+),/, workflow, capture: :all_but_first)

    [nifs] = Regex.run(~r/^\s*nif: \[(.*)\]/m, workflow, capture: :all_but_first)
    nifs = Regex.scan(~r/"([\d.]+)"/, nifs, capture: :all_but_first)

    assert Enum.sort(List.flatten(targets)) == Enum.sort(MaculaQuic.Native.Target.targets())
    assert List.flatten(nifs) == MaculaQuic.Native.Target.nif_versions()
    # One job publishes, after every build (see the workflow).
    assert workflow =~ ~r/publish:\n(.*\n)*?\s+needs: build_release/
  end
end
