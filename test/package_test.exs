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
end
