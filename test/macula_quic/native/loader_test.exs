defmodule MaculaQuic.Native.LoaderTest do
  # Not async: the loader reports through Mix.shell(), which these tests redirect.
  use ExUnit.Case, async: false

  alias MaculaQuic.Native.{Loader, SourceBuild}

  @moduletag :tmp_dir

  setup do
    shell = Mix.shell()
    Mix.shell(Mix.Shell.Process)
    on_exit(fn -> Mix.shell(shell) end)
  end

  describe "build_from_source?/3" do
    test "a -dev pre-release always builds" do
      assert Loader.build_from_source?(%{}, false, "0.1.0-dev")
      assert Loader.build_from_source?(%{}, false, "1.2.0-dev.3")
    end

    test "a release downloads unless told otherwise" do
      refute Loader.build_from_source?(%{}, false, "0.1.0")
      refute Loader.build_from_source?(%{}, false, "0.1.0-rc.1")
      refute Loader.build_from_source?(%{"MACULA_QUIC_BUILD" => "0"}, false, "0.1.0")
      assert Loader.build_from_source?(%{"MACULA_QUIC_BUILD" => "1"}, false, "0.1.0")
      assert Loader.build_from_source?(%{"MACULA_QUIC_BUILD" => "true"}, false, "0.1.0")
      assert Loader.build_from_source?(%{}, true, "0.1.0")
      # RustlerPrecompiled's switch for every package that uses its conventions.
      assert Loader.build_from_source?(
               %{"RUSTLER_PRECOMPILED_FORCE_BUILD_ALL" => "1"},
               false,
               "0.1.0"
             )

      refute Loader.build_from_source?(
               %{"RUSTLER_PRECOMPILED_FORCE_BUILD_ALL" => "0"},
               false,
               "0.1.0"
             )
    end
  end

  test "cache dir and base URL come from the environment, with defaults" do
    assert Loader.cache_dir(%{"MACULA_QUIC_CACHE_DIR" => "/srv/cache"}) == "/srv/cache"
    global = %{"RUSTLER_PRECOMPILED_GLOBAL_CACHE_PATH" => "/nix/artifacts"}
    assert Loader.cache_dir(global) == "/nix/artifacts"

    assert Loader.cache_dir(Map.put(global, "MACULA_QUIC_CACHE_DIR", "/srv/cache")) ==
             "/srv/cache"

    assert Loader.cache_dir(%{}) ==
             List.to_string(:filename.basedir(:user_cache, ~c"macula_quic"))

    # Without HOME there is no user cache dir (:filename.basedir/2 raises in a VM started
    # without one): no cache, rather than a shared directory another user could prepare.
    ebin = Path.dirname(:code.which(Loader))
    code = "IO.write(inspect(MaculaQuic.Native.Loader.cache_dir(%{})))"

    assert {dir, 0} =
             System.cmd("elixir", ["-pa", ebin, "-e", code],
               env: [{"HOME", nil}, {"XDG_CACHE_HOME", nil}],
               stderr_to_stdout: true
             )

    assert dir == "nil"

    assert Loader.base_url(%{"MACULA_QUIC_BASE_URL" => "http://mirror/v1"}, "1.0.0") ==
             "http://mirror/v1"

    assert Loader.base_url(%{}, "1.0.0") ==
             "https://github.com/macula-io/macula_quic/releases/download/v1.0.0"
  end

  test "relative paths in the environment are taken from the project being built" do
    env = %{
      "MACULA_QUIC_CACHE_DIR" => "cache",
      "HEX_CACERTS_PATH" => "../ca.pem",
      "RUSTLER_PRECOMPILED_GLOBAL_CACHE_PATH" => "shared",
      "HOME" => "relative/is/left/alone"
    }

    assert Loader.expand_relative_paths(env, "/home/u/app") == %{
             env
             | "MACULA_QUIC_CACHE_DIR" => "/home/u/app/cache",
               "HEX_CACERTS_PATH" => "/home/u/ca.pem"
           }

    absolute = %{"MACULA_QUIC_CACHE_DIR" => "/srv/cache", "HEX_CACERTS_PATH" => ""}
    assert Loader.expand_relative_paths(absolute, "/home/u/app") == absolute
  end

  test "each failure's advice fits it" do
    url = "https://example.invalid/x.tar.gz"
    cached = {:checksum_mismatch, "x.tar.gz", "sha256:aa", "sha256:bb"}

    # A corrupt cache and a download that failed: the download's own advice.
    assert Loader.format_error({:cached_and_download_failed, cached, {:http_status, url, 404}}) =~
             "No precompiled NIF is published at that address"

    assert Loader.format_error(
             {:cached_and_download_failed, cached, {:http_failed, url, {:no_cacerts, "none"}}}
           ) =~ "ca-certificates"

    # A stall or an oversized body: what happened, in words.
    assert Loader.format_error({:http_failed, url, {:stalled, 60_000}}) =~
             "nothing arrived for 60 s"

    message = Loader.format_error({:http_failed, url, {:too_large, 256 * 1024 * 1024}})
    assert message =~ "larger than 256 MiB"
    assert message =~ "MACULA_QUIC_BASE_URL"

    # A directory that cannot be written: building from source would write there too.
    message = Loader.format_error({:write_failed, "/ro/priv/native/lib.so", :eacces})
    assert message =~ "writable"
    refute message =~ "MACULA_QUIC_BUILD"
  end

  describe "source builds" do
    test "a -dev version builds from source, and a missing cargo says what to do", ctx do
      opts = source_opts(ctx, version: "0.1.0-dev", env: %{})
      assert {:error, {:cargo_missing, _}} = Loader.prepare(opts)

      error = assert_raise Mix.Error, fn -> Loader.prepare!(opts) end
      assert error.message =~ "Install Rust"
      assert error.message =~ "released"
      # Every switch that asks for a source build is named, not only the one in this test.
      for switch <- ["-dev", "MACULA_QUIC_BUILD=1", "build_from_source: true", "force_build"],
          do: assert(error.message =~ switch)

      assert Path.wildcard(Path.join(ctx.tmp_dir, "priv/**")) == []
    end

    test "MACULA_QUIC_BUILD=1 forces a source build of a release version", ctx do
      opts = source_opts(ctx, version: "0.1.0", env: %{"MACULA_QUIC_BUILD" => "1"})
      assert {:error, {:cargo_missing, _}} = Loader.prepare(opts)
      assert_received {:mix_shell, :info, ["Building the macula_quic NIF from source" <> _]}
    end

    test "extra cargo features (the test suite's hooks) force it: no precompiled library has them",
         ctx do
      opts = source_opts(ctx, version: "0.1.0", env: %{}, cargo_features: ["test_hooks"])
      assert {:error, {:cargo_missing, _}} = Loader.prepare(opts)
      assert_received {:mix_shell, :info, ["Building the macula_quic NIF from source" <> _]}
    end

    test "RustlerPrecompiled's application config forces it, as for its own packages", ctx do
      # An app name of the test's own, so that nothing else reads this configuration.
      app = :macula_quic_loader_config_test
      # (A download would fail at once: nothing listens there. None is made: there is no
      # checksum file in this directory, which stops an install first.)
      base_url = "http://127.0.0.1:9/nothing"

      opts =
        source_opts(ctx, version: "0.1.0", env: %{}, base_url: base_url)
        |> Keyword.put(:otp_app, app)

      on_exit(fn -> Application.delete_env(:rustler_precompiled, :force_build) end)
      on_exit(fn -> Application.delete_env(:rustler_precompiled, :force_build_all) end)

      # A release version with no configuration installs a precompiled library.
      assert {:error, {:checksum_file_unreadable, _, :enoent}} = Loader.prepare(opts)

      for {key, value} <- [
            force_build: [
              other_app: true,
              "not a keyword": 1,
              macula_quic_loader_config_test: true
            ],
            force_build_all: true
          ] do
        Application.put_env(:rustler_precompiled, key, value)
        assert {:error, {:cargo_missing, _}} = Loader.prepare(opts), inspect({key, value})
        Application.delete_env(:rustler_precompiled, key)
      end

      # Another package's switch, or a value that is not `true`, is not this one's.
      for value <- [[other_app: true], [macula_quic_loader_config_test: "yes"], :not_a_list] do
        Application.put_env(:rustler_precompiled, :force_build, value)

        assert {:error, {:checksum_file_unreadable, _, :enoent}} = Loader.prepare(opts),
               inspect(value)
      end
    end

    test "the build_from_source option forces it too", ctx do
      opts = source_opts(ctx, version: "0.1.0", env: %{}, build_from_source: true)
      assert {:error, {:cargo_missing, _}} = Loader.prepare(opts)
    end

    test "cargo arguments pin the target dir and pass features" do
      request = %{crate_dir: "/p/native/macula_quic", native_dir: "/x", features: ["a", "b"]}

      assert SourceBuild.cargo_args(request) == [
               "build",
               "--release",
               "--manifest-path",
               "/p/native/macula_quic/Cargo.toml",
               "--target-dir",
               "/p/native/macula_quic/target",
               "--features",
               "a,b"
             ]

      assert "--features" not in SourceBuild.cargo_args(%{request | features: []})
    end

    test "library names per OS; always placed as libmacula_quic.<so|dll>" do
      assert SourceBuild.library_names({:unix, :linux}) ==
               {"libmacula_quic.so", "libmacula_quic.so"}

      assert SourceBuild.library_names({:unix, :darwin}) ==
               {"libmacula_quic.dylib", "libmacula_quic.so"}

      assert SourceBuild.library_names({:win32, :nt}) == {"macula_quic.dll", "libmacula_quic.dll"}
      assert SourceBuild.lib_path() == "native/libmacula_quic"
    end

    test "a build with extra features gets its own name, so builds for other envs leave it alone" do
      assert SourceBuild.library_names({:unix, :linux}, ["test_hooks"]) ==
               {"libmacula_quic.so", "libmacula_quic-test_hooks.so"}

      assert SourceBuild.library_names({:win32, :nt}, ["b", "a"]) ==
               {"macula_quic.dll", "libmacula_quic-a-b.dll"}

      assert SourceBuild.lib_path(["test_hooks"]) == "native/libmacula_quic-test_hooks"
      assert SourceBuild.lib_path([]) == SourceBuild.lib_path()
    end

    test "this build's library is where the source build put it" do
      # The test build has the crate's test_hooks feature (see MaculaQuic.Native).
      assert MaculaQuic.Native.__lib_path__() == SourceBuild.lib_path(["test_hooks"])

      path =
        Path.join(
          List.to_string(:code.priv_dir(:macula_quic)),
          MaculaQuic.Native.__lib_path__() <> ".so"
        )

      assert File.regular?(path)
    end
  end

  test "an unsupported platform is an error that suggests building from source", ctx do
    opts =
      source_opts(ctx,
        version: "0.1.0",
        env: %{"TARGET_ARCH" => "sparc64", "TARGET_OS" => "linux", "TARGET_ABI" => "gnu"}
      )

    assert {:error, {:unsupported_target, "sparc64-" <> _, _}} = Loader.prepare(opts)
    message = assert_raise(Mix.Error, fn -> Loader.prepare!(opts) end).message
    assert message =~ "no precompiled NIF for target sparc64"
    assert message =~ "MACULA_QUIC_BUILD=1"
  end

  defp source_opts(%{tmp_dir: dir}, opts) do
    [
      otp_app: :macula_quic,
      project_dir: dir,
      priv_dir: Path.join(dir, "priv"),
      cache_dir: Path.join(dir, "cache"),
      cargo: "macula-quic-no-such-cargo"
    ] ++ opts
  end
end
