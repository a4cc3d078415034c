defmodule MaculaQuic.Native.PrecompiledDownloadTest do
  # End to end over a real local HTTP server: download, verify, cache, place. Tagged so the
  # network-ish tests can run alone: `mix test --only loader_network`.
  # Not async: the loader reports through Mix.shell(), which these tests redirect.
  use ExUnit.Case, async: false

  alias MaculaQuic.{LoaderFixtures, LoaderHttpServer}
  alias MaculaQuic.Native.{Artifact, Checksum, Loader}

  @moduletag :tmp_dir
  @moduletag :loader_network

  @version "0.1.0"
  @nif "2.16"
  @target "x86_64-unknown-linux-gnu"

  setup %{tmp_dir: dir} do
    shell = Mix.shell()
    Mix.shell(Mix.Shell.Process)
    on_exit(fn -> Mix.shell(shell) end)

    library = LoaderFixtures.built_library!()
    www = Path.join(dir, "www")
    File.mkdir_p!(www)
    file_name = Artifact.file_name(@version, @nif, @target)
    tarball_name = Artifact.tarball_name(@version, @nif, @target)
    tarball = LoaderFixtures.tarball!(www, file_name, library)

    checksum_file = Path.join(dir, "checksum-Elixir.MaculaQuic.Native.exs")
    :ok = Checksum.write(checksum_file, %{tarball_name => Checksum.sha256(tarball)})

    server = LoaderHttpServer.start!(www)
    on_exit(fn -> LoaderHttpServer.stop(server) end)

    priv = Path.join(dir, "priv")
    cache = Path.join(dir, "cache")

    opts = [
      otp_app: :macula_quic,
      project_dir: dir,
      version: @version,
      env: %{},
      base_url: server.base_url,
      cache_dir: cache,
      priv_dir: priv,
      checksum_file: checksum_file,
      target: @target,
      nif_version: @nif,
      max_retries: 0,
      retry_delay_ms: 0,
      cargo: "macula-quic-no-such-cargo"
    ]

    %{
      opts: opts,
      server: server,
      www: www,
      library: library,
      tarball: tarball,
      tarball_name: tarball_name,
      file_name: file_name,
      priv: priv,
      cache: cache,
      checksum_file: checksum_file
    }
  end

  test "downloads, verifies, caches and places the library", ctx do
    assert Loader.prepare(ctx.opts) ==
             {:ok, "native/libmacula_quic-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu"}

    assert File.read!(Path.join([ctx.priv, "native", ctx.file_name])) == ctx.library
    assert File.read!(Path.join(ctx.cache, ctx.tarball_name)) == ctx.tarball

    assert LoaderFixtures.files_under(ctx.priv) == [
             Path.join([ctx.priv, "native", ctx.file_name])
           ]

    assert_received {:mix_shell, :info, ["Installing precompiled NIF " <> _]}
  end

  test "a relative MACULA_QUIC_CACHE_DIR is taken from the project being built", ctx do
    # Mix compiles a dependency from inside its own directory; the user meant their project's.
    app = Path.join(ctx.tmp_dir, "app")
    File.mkdir_p!(app)
    env = %{"MACULA_QUIC_CACHE_DIR" => "relcache"}
    opts = ctx.opts |> Keyword.delete(:cache_dir) |> Keyword.merge(env: env, root_dir: app)

    File.cd!(ctx.priv |> Path.dirname() |> Path.join("elsewhere") |> tap(&File.mkdir_p!/1), fn ->
      assert {:ok, _} = Loader.prepare(opts)
    end)

    assert File.read!(Path.join([app, "relcache", ctx.tarball_name])) == ctx.tarball
    refute File.exists?(Path.join([ctx.tmp_dir, "elsewhere", "relcache"]))
  end

  test "a cache that cannot be written does not stop the install: it says so", ctx do
    # A regular file where the cache directory would go: nothing can be created under it.
    blocker = Path.join(ctx.tmp_dir, "not_a_dir")
    File.write!(blocker, "")
    opts = Keyword.put(ctx.opts, :cache_dir, Path.join(blocker, "cache"))

    assert {:ok, _} = Loader.prepare(opts)
    assert File.read!(Path.join([ctx.priv, "native", ctx.file_name])) == ctx.library
    assert_received {:mix_shell, :info, ["macula_quic: could not cache " <> message]}
    assert message =~ "MACULA_QUIC_CACHE_DIR"
  end

  test "without a cache directory (no HOME), it downloads and writes no cache", ctx do
    opts = Keyword.put(ctx.opts, :cache_dir, nil)
    assert {:ok, _} = Loader.prepare(opts)
    assert File.read!(Path.join([ctx.priv, "native", ctx.file_name])) == ctx.library
    assert LoaderFixtures.files_under(ctx.cache) == []
  end

  test "prepare! returns the load path, as MaculaQuic.Native uses it", ctx do
    assert Loader.prepare!(ctx.opts) ==
             "native/libmacula_quic-v0.1.0-nif-2.16-x86_64-unknown-linux-gnu"
  end

  test "a second run uses the cache, without HTTP", ctx do
    assert {:ok, _} = Loader.prepare(ctx.opts)
    LoaderHttpServer.stop(ctx.server)
    File.rm_rf!(ctx.priv)

    assert {:ok, _} = Loader.prepare(ctx.opts)
    assert File.read!(Path.join([ctx.priv, "native", ctx.file_name])) == ctx.library
  end

  test "a tampered download is rejected and nothing is written", ctx do
    LoaderFixtures.tarball!(ctx.www, ctx.file_name, ctx.library <> "evil")

    assert {:error, {:checksum_mismatch, name, expected, actual}} = Loader.prepare(ctx.opts)
    assert name == ctx.tarball_name
    assert expected == Checksum.sha256(ctx.tarball)
    assert actual != expected
    assert LoaderFixtures.files_under(ctx.priv) == []
    assert LoaderFixtures.files_under(ctx.cache) == []

    message = assert_raise(Mix.Error, fn -> Loader.prepare!(ctx.opts) end).message
    assert message =~ "checksum mismatch for #{ctx.tarball_name}"
    assert message =~ "MACULA_QUIC_BUILD=1"
  end

  test "a missing checksum entry is rejected, before any download, and nothing is written",
       ctx do
    :ok = Checksum.write(ctx.checksum_file, %{"something-else.so.tar.gz" => "sha256:00"})
    # Offline: the reason is still the missing entry, not the network.
    LoaderHttpServer.stop(ctx.server)

    assert Loader.prepare(ctx.opts) ==
             {:error, {:checksum_missing, ctx.tarball_name, ctx.checksum_file}}

    assert LoaderFixtures.files_under(ctx.priv) == []
    assert LoaderFixtures.files_under(ctx.cache) == []

    message = assert_raise(Mix.Error, fn -> Loader.prepare!(ctx.opts) end).message
    assert message =~ "no checksum for #{ctx.tarball_name}"
    assert message =~ "MACULA_QUIC_BUILD=1"
  end

  test "a missing checksum entry is rejected even when the tarball is cached", ctx do
    assert {:ok, _} = Loader.prepare(ctx.opts)
    File.rm_rf!(ctx.priv)
    :ok = Checksum.write(ctx.checksum_file, %{})

    assert {:error, {:checksum_missing, _, _}} = Loader.prepare(ctx.opts)
    assert LoaderFixtures.files_under(ctx.priv) == []
  end

  test "an unpublished artifact is a clear 404", ctx do
    opts = Keyword.put(ctx.opts, :version, "0.0.9")
    name = "libmacula_quic-v0.0.9-nif-2.16-#{@target}.so.tar.gz"
    url = "#{ctx.server.base_url}/#{name}"
    # Listed in the checksum file, but not on the server.
    :ok = Checksum.write(ctx.checksum_file, %{name => "sha256:00"})

    assert Loader.prepare(opts) == {:error, {:http_status, url, 404}}
    message = assert_raise(Mix.Error, fn -> Loader.prepare!(opts) end).message
    assert message =~ "downloading #{url} failed with HTTP status 404"
    assert message =~ "MACULA_QUIC_BASE_URL"
    assert LoaderFixtures.files_under(ctx.priv) == []
  end

  test "a corrupted cached tarball is re-verified, discarded and fetched again", ctx do
    assert {:ok, _} = Loader.prepare(ctx.opts)
    cached = Path.join(ctx.cache, ctx.tarball_name)
    File.write!(cached, "truncated")
    File.rm_rf!(ctx.priv)

    assert {:ok, _} = Loader.prepare(ctx.opts)
    assert File.read!(cached) == ctx.tarball
    assert File.read!(Path.join([ctx.priv, "native", ctx.file_name])) == ctx.library
  end

  test "a corrupted cache with the server gone fails cleanly", ctx do
    assert {:ok, _} = Loader.prepare(ctx.opts)
    File.write!(Path.join(ctx.cache, ctx.tarball_name), "truncated")
    File.rm_rf!(ctx.priv)
    LoaderHttpServer.stop(ctx.server)

    assert {:error, reason} = Loader.prepare(ctx.opts)

    assert {:cached_and_download_failed, {:checksum_mismatch, _, _, _}, {:http_failed, _, _}} =
             reason

    assert LoaderFixtures.files_under(ctx.priv) == []
    assert Loader.format_error(reason) =~ "the cached tarball is unusable"
  end

  test "network failures are retried, then reported", ctx do
    # A server that accepts each connection and closes it at once, counting the attempts.
    {:ok, listen} = :gen_tcp.listen(0, [:binary, active: false, ip: {127, 0, 0, 1}])
    {:ok, port} = :inet.port(listen)
    parent = self()

    closer =
      spawn_link(fn ->
        Stream.repeatedly(fn -> :gen_tcp.accept(listen) end)
        |> Enum.each(fn
          {:ok, socket} ->
            send(parent, :attempt)
            :gen_tcp.close(socket)

          {:error, _} ->
            exit(:normal)
        end)
      end)

    on_exit(fn -> Process.exit(closer, :kill) end)
    opts = Keyword.merge(ctx.opts, max_retries: 2, base_url: "http://127.0.0.1:#{port}")

    assert {:error, {:http_failed, url, _reason}} = Loader.prepare(opts)
    assert url =~ "127.0.0.1:#{port}"
    # The first attempt and two retries.
    for _ <- 1..3, do: assert_received(:attempt)
    refute_received :attempt
    :gen_tcp.close(listen)
    message = assert_raise(Mix.Error, fn -> Loader.prepare!(opts) end).message
    assert message =~ "could not download"
    assert message =~ "HTTPS_PROXY"
  end

  test "a verified tarball without the expected library is rejected", ctx do
    wrong = LoaderFixtures.tarball!(Path.join(ctx.www, "x"), "libother.so", ctx.library)
    File.write!(Path.join(ctx.www, ctx.tarball_name), wrong)
    :ok = Checksum.write(ctx.checksum_file, %{ctx.tarball_name => Checksum.sha256(wrong)})

    assert {:error, {:bad_tarball, _, {:member_missing, _, ["libother.so"]}}} =
             Loader.prepare(ctx.opts)

    assert LoaderFixtures.files_under(ctx.priv) == []
  end

  test "the target and NIF version default to this VM's", ctx do
    {:ok, %{target: target, nif_version: nif}} =
      MaculaQuic.Native.Target.resolve(MaculaQuic.Native.Target.host())

    LoaderFixtures.tarball!(ctx.www, Artifact.file_name(@version, nif, target), ctx.library)
    tarball = File.read!(Path.join(ctx.www, Artifact.tarball_name(@version, nif, target)))

    :ok =
      Checksum.write(ctx.checksum_file, %{
        Artifact.tarball_name(@version, nif, target) => Checksum.sha256(tarball)
      })

    opts = ctx.opts |> Keyword.delete(:target) |> Keyword.delete(:nif_version)
    assert {:ok, path} = Loader.prepare(opts)
    assert path == "native/" <> Artifact.lib_name(@version, nif, target)
  end
end
