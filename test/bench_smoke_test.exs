defmodule MaculaQuic.BenchSmokeTest do
  # The benchmark suite (bin/bench, README's Benchmarks section) is a deliverable of its own:
  # this runs the whole of it at a tiny scale, raw-Quinn baseline and all, so that a change to
  # the API or the baseline that breaks it fails here rather than on the next benchmark run.
  # It checks that every workload ran on every implementation and wrote its report, not
  # what the figures are (at this scale they are noise).
  use ExUnit.Case, async: false

  @moduletag :bench_smoke
  @moduletag timeout: 300_000

  @root Path.expand("..", __DIR__)

  # The rows bin/bench's report has (their sizes follow the scale), and which of raw Quinn,
  # :ssl and :gen_tcp have a figure in them.
  @rows [
    {~r/^bulk: [\d.]+ MiB, active$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^bulk: [\d.]+ MiB, passive$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^echo: 64 B$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^echo: 64 B, send\/2$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^echo: 4096 B$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^echo: 4096 B, send\/2$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^echo: 64 B, two OS processes$/, [:quinn]},
    {~r/^echo: 64 B datagrams$/, [:quinn]},
    {~r/^fanout: 100 × [\d.]+ MiB$/, [:quinn]},
    {~r/^handshake: sequential$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^handshake: 16 concurrent$/, [:quinn, :ssl, :gen_tcp]},
    {~r/^memory: \d+ idle connections$/, [:quinn]}
  ]

  setup_all do
    out =
      Path.join(
        System.tmp_dir!(),
        "macula_quic_bench_smoke_#{System.unique_integer([:positive])}"
      )

    File.mkdir_p!(out)
    on_exit(fn -> File.rm_rf(out) end)
    %{out: out, quinn: build_baseline!()}
  end

  test "bin/bench's suite runs every workload on every implementation and writes its report",
       %{out: out, quinn: quinn} do
    env = [
      {"BENCH_SCALE", "0.01"},
      {"BENCH_QUINN", quinn},
      {"BENCH_OUT", out},
      {"MIX_ENV", nil}
    ]

    ebin = Path.join(Mix.Project.app_path(), "ebin")
    script = Path.join(@root, "bench/run.exs")

    {log, status} =
      System.cmd(System.find_executable("elixir"), ["-pa", ebin, script],
        cd: @root,
        env: env,
        stderr_to_stdout: true
      )

    assert status == 0, "bench/run.exs exited #{status}:\n#{log}"
    # It reports progress as it goes.
    assert log =~ "[bench"
    md = File.read!(Path.join(out, "latest.md"))
    json = File.read!(Path.join(out, "latest.json"))

    table = table_rows(md)

    assert map_size(table) == length(@rows), "rows of latest.md: #{inspect(Map.keys(table))}"

    for {pattern, others} <- @rows do
      {row, cells} =
        Enum.find(table, fn {name, _} -> name =~ pattern end) ||
          flunk("no row like #{inspect(pattern)} in latest.md:\n#{md}")

      assert positive?(cells.macula), "#{row}: macula_quic #{inspect(cells.macula)}"

      for who <- others do
        assert positive?(Map.fetch!(cells, who)),
               "#{row}: #{who} #{inspect(Map.fetch!(cells, who))}"
      end

      assert cells.ratio =~ ~r/^\d+\.\d+×$/, "#{row}: ratio #{inspect(cells.ratio)}"
    end

    # Quinn's segmentation-offload figure and both sides' page faults beside each bulk row, and
    # the machine line.
    assert md =~ "udp_tx ios/datagrams macula"
    assert md =~ ~r/minor page faults per MiB macula [\d.]+, Quinn [\d.]+/
    assert md =~ ~r/^Machine: \d+ CPUs/m
    # The cryptography each side's handshakes agree on, asked of each (not written down):
    # TLS 1.3 suites only, and a key exchange group for raw Quinn's.
    assert md =~
             ~r/QUIC \(raw Quinn's TLS configuration, the NIF's settings\): TLS13_\w+, \w+;/

    assert md =~ ~r/:ssl: (aes|chacha)\w+\/sha\d+, \w+ offered/

    for key <- ~w("machine" "crypto" "results" "mib_s" "rt_s" "hs_s" "bytes_per_conn"),
        do: assert(json =~ key)
  end

  test "bin/rounds runs a variant on another build (ebin=, as bench/build_rev.sh lays it out)",
       %{out: out, quinn: quinn} do
    # A stand-in for a commit's build: this build, in build_rev.sh's layout, with its commit file.
    build = Path.join(out, "other")
    app = Path.join(build, "macula_quic")
    File.mkdir_p!(app)

    # (priv/ holds symlinks into the crate's target directory: copied as files, as build_rev.sh does.)
    for dir <- ~w(ebin priv) do
      {_, 0} = System.cmd("cp", ["-rL", Path.join(Mix.Project.app_path(), dir), app])
    end

    File.write!(Path.join(app, "REVISION"), "0123456789abcdef0123456789abcdef01234567\n")

    {log, status} =
      rounds(["hs", "quinn", "other:ebin=#{build}", "default"], [
        {"ROUNDS", "2"},
        {"BENCH_QUINN", quinn}
      ])

    assert status == 0, "bench/rounds.exs exited #{status}:\n#{log}"
    # Each round starts one variant further along the list.
    order = fn r -> Regex.scan(~r/round #{r}\/2 (\w+): \d/, log, capture: :all_but_first) end
    assert order.(1) == [["quinn"], ["other"], ["default"]], log
    assert order.(2) == [["other"], ["default"], ["quinn"]], log
    # The report names the other build by its commit, and both variants have a figure (with
    # decimals when below 100, as on a slow host).
    assert log =~ ~r/^\| other \| `build=0123456789ab` \| [\d.]+ handshakes\/s/m, log
    assert log =~ ~r/^\| default \| defaults \| [\d.]+ handshakes\/s/m, log
    # Each macula_quic variant after the first is compared with it round by round (paired).
    assert log =~ ~r/^\| default \|.*\| [\d.]+ of other; higher in [0-2] of 2 \|$/m, log
    assert log =~ ~r/^\| other \|.*× of quinn \| – \|$/m, log

    # The variant really runs that build: without its NIF it fails, naming the build's path.
    File.rm_rf!(Path.join(app, "priv"))
    {log, status} = rounds(["hs", "other:ebin=#{build}"], [{"ROUNDS", "1"}])
    assert status != 0
    assert log =~ "could not load the NIF library #{app}/priv/native/", log

    # A directory without a build is refused before anything runs.
    {log, status} = rounds(["hs", "quinn", "x:ebin=#{Path.join(out, "none")}"], [])
    assert status == 2
    assert log =~ "variant x: no macula_quic build in"
  end

  defp rounds(args, env) do
    ebin = Path.join(Mix.Project.app_path(), "ebin")
    script = Path.join(@root, "bench/rounds.exs")

    System.cmd(System.find_executable("elixir"), [script | args],
      cd: @root,
      env: [{"BENCH_EBIN", ebin}, {"MIX_ENV", nil} | env],
      stderr_to_stdout: true
    )
  end

  # Builds the raw-Quinn baseline (cargo shares the NIF's compiled dependencies: seconds).
  defp build_baseline! do
    manifest = Path.join(@root, "native/macula_quic/Cargo.toml")

    {log, status} =
      System.cmd(
        "cargo",
        ~w(build --release --example quinn_baseline --manifest-path) ++ [manifest],
        stderr_to_stdout: true
      )

    assert status == 0, "building quinn_baseline failed:\n#{log}"
    path = Path.join(@root, "native/macula_quic/target/release/examples/quinn_baseline")
    assert File.exists?(path)
    path
  end

  # latest.md's table: row name => the implementations' cells and the macula/Quinn ratio.
  defp table_rows(md) do
    for line <- String.split(md, "\n"),
        [_, name, _unit, macula, quinn, ssl, tcp, ratio | _] <- [String.split(line, "|")],
        name = String.trim(name),
        name not in ["workload", "---"],
        into: %{} do
      {name,
       %{
         macula: String.trim(macula),
         quinn: String.trim(quinn),
         ssl: String.trim(ssl),
         gen_tcp: String.trim(tcp),
         ratio: String.trim(ratio)
       }}
    end
  end

  defp positive?(cell) do
    case Float.parse(cell) do
      {x, _} -> x > 0
      :error -> false
    end
  end
end
