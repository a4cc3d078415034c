# Interleaved rounds of one workload: each round measures every variant once, in turn, each
# measurement in a fresh OS process (bench/one.exs for macula_quic, quinn_baseline for raw
# Quinn). For settings that only take effect when the NIF loads, and for comparisons finer than
# bin/bench's five runs can tell apart: the host drifts by tens of percent within minutes, so
# variants are compared within a round (each round starting one variant further along the
# list, so that no variant always goes first), and the summary gives each variant's median, its
# range, its median ratio to raw Quinn's measurement of the same round and, for each variant
# after the first of its kind (macula_quic, or raw Quinn), its median ratio to that first one's
# in the same round and in how many rounds it was higher ("paired": the fairest comparison of
# two builds or settings when the host drifts), followed by a table of every round's figures
# (also printed, for the rounds done, when a measurement fails).
#
# Run it with bin/rounds (which builds what it needs):
#
#   bin/rounds WORKLOAD VARIANT...
#   ROUNDS=8 bin/rounds echo quinn default spin0:BENCH_RUNTIME_SPIN_US=0
#   bin/rounds hs quinn default 'sbwt:ERL_AFLAGS=+sbwt very_long'
#
# WORKLOAD: echo (64 B, async_send/2), echo_send (64 B, send/2), echo4096, echo2p (64 B with
# the echoing end in a second OS process, as bin/bench's "two OS processes" row), bulk (1 GiB,
# active), passive (1 GiB, recv/3), hs (sequential handshakes), hs16 (16 at a time), fanout
# (100 streams × 10 MiB on one connection); each is
# defined once for both sides in bench/lib/workloads.ex.
# VARIANT: `quinn` (raw Quinn; so is any name starting with "quinn"), or
# NAME[:VAR=VALUE[,VAR=VALUE...]], macula_quic with those
# environment variables (BENCH_RUNTIME_SPIN_US, BENCH_INLINE_WATCH_US, BENCH_RUNTIME_WORKERS,
# ERL_AFLAGS, ...). One more VAR, `halt_poll_ns`, is a host setting: as root, it writes
# /sys/module/haltpoll/parameters/guest_halt_poll_ns (how long an idle vCPU of a KVM guest
# polls before it halts) before the variant's measurement; the value found at the start is put
# back at the end, also after a failure. A quinn variant takes it too (`quinn:halt_poll_ns=0`),
# and `bin=PATH`: another build of the baseline (`quinn_pgo:bin=/tmp/pgo/quinn_baseline`).
# And `ebin=DIR` runs the variant with another build of macula_quic: DIR is what
# bench/build_rev.sh built (a commit's app and NIF) or that build's `macula_quic/ebin`; the other
# variants run the current tree's. To compare two commits:
#
#   bench/build_rev.sh 7fe5a38 /tmp/old
#   ROUNDS=6 bin/rounds bulk quinn old:ebin=/tmp/old default
#
#   ROUNDS      rounds (default 8)
#   ROUNDS_OUT  also write the measurements and the summary to this JSON file
#   BENCH_QUINN, BENCH_EBIN   the baseline binary and the app's ebin (set by bin/rounds)
Code.require_file("lib/util.ex", __DIR__)
# This VM only starts the measurements: macula_quic's side of each workload runs in one.exs's
# fresh VMs, which load Bench.Macula (and the NIF) themselves, so its calls are not defined here.
Code.put_compiler_option(:no_warn_undefined, [Bench.Macula])
Code.require_file("lib/workloads.ex", __DIR__)

defmodule Bench.Rounds do
  import Bench.Util, only: [fmt: 1, median: 1, progress: 1]

  def main(args) do
    {workload, variants} = parse_args(args)
    rounds = env_int("ROUNDS", 8)
    cert_dir = Path.join(System.tmp_dir!(), "macula_quic_rounds_#{System.os_time()}")
    cert = Bench.Util.make_cert(cert_dir)

    ctx = %{
      workload: workload,
      cert: cert,
      cert_dir: cert_dir,
      quinn: Bench.Util.quinn_path(),
      ebin: ebin()
    }

    m = Bench.Util.machine()

    progress(
      "#{workload}: #{rounds} rounds of #{Enum.map_join(variants, ", ", & &1.name)}; " <>
        "#{m.nproc} CPUs, Linux #{m.kernel}, cpuidle #{m.cpuidle}"
    )

    halt_poll0 =
      if Enum.any?(variants, &Map.has_key?(&1.host, "halt_poll_ns")), do: read_halt_poll()

    # Each completed round is kept: when a measurement fails, the rounds before it are still
    # summarised before the error is raised again.
    results =
      try do
        Enum.reduce(1..rounds, [], fn r, done ->
          row =
            try do
              # Round r starts with the r-th variant (see Bench.Util.rotate/2).
              for v <- Bench.Util.rotate(variants, r - 1) do
                set_host(v.host)
                x = measure(ctx, v)
                progress("round #{r}/#{rounds} #{v.name}: #{fmt(x)}")
                {v.name, x}
              end
            rescue
              e ->
                if done != [] do
                  done = Enum.reverse(done)
                  IO.puts("\n" <> report(workload, m, summarize(workload, variants, done), done))

                  progress(
                    "round #{r} failed; the tables above have the #{length(done)} round(s) before it"
                  )
                end

                reraise e, __STACKTRACE__
            end

          progress(
            "round #{r}/#{rounds}: " <> Enum.map_join(row, " ", fn {n, x} -> "#{n}=#{fmt(x)}" end)
          )

          [Map.new(row) | done]
        end)
        |> Enum.reverse()
      after
        if halt_poll0, do: File.write!(Bench.Util.halt_poll_file(), halt_poll0)
        File.rm_rf(cert_dir)
      end

    summary = summarize(workload, variants, results)

    IO.puts("\n" <> report(workload, m, summary, results))

    if out = System.get_env("ROUNDS_OUT") do
      report = %{workload: workload, rounds: results, summary: summary, machine: m}
      File.write!(out, Bench.Util.json(report))
      progress("wrote #{out}")
    end
  end

  defp parse_args([workload | [_ | _] = variants]) do
    workload in Bench.Workloads.names() ||
      usage(
        "unknown workload #{inspect(workload)}; one of #{Enum.join(Bench.Workloads.names(), ", ")}"
      )

    parsed = Enum.map(variants, &parse_variant/1)
    names = Enum.map(parsed, & &1.name)

    length(Enum.uniq(names)) == length(names) ||
      usage("variant names must differ: #{inspect(names)}")

    {workload, parsed}
  end

  defp parse_args(_), do: usage("give a workload and at least one variant")

  # "name:VAR=value,VAR=value": a comma starts a new setting only where VAR= follows, so values
  # such as ERL_AFLAGS may hold spaces (and commas that no `NAME=` follows).
  defp parse_variant(spec) do
    {name, settings} =
      case String.split(spec, ":", parts: 2) do
        [name] -> {name, ""}
        [name, s] -> {name, s}
      end

    name =~ ~r/^[A-Za-z0-9_.-]+$/ || usage("bad variant name #{inspect(name)}")

    pairs =
      settings
      |> String.split(~r/,(?=[A-Za-z_][A-Za-z0-9_]*=)/, trim: true)
      |> Enum.map(fn kv ->
        case String.split(kv, "=", parts: 2) do
          [k, v] when k != "" -> {k, v}
          _ -> usage("bad setting #{inspect(kv)} in variant #{inspect(spec)}")
        end
      end)

    {ebin, pairs} = Enum.split_with(pairs, fn {k, _} -> k == "ebin" end)
    {bin, pairs} = Enum.split_with(pairs, fn {k, _} -> k == "bin" end)
    {host, env} = Enum.split_with(pairs, fn {k, _} -> k == "halt_poll_ns" end)

    Enum.each(host, fn {_, v} ->
      match?({n, ""} when n >= 0, Integer.parse(v)) ||
        usage("halt_poll_ns must be a count of ns: #{inspect(v)}")
    end)

    kind = if String.starts_with?(name, "quinn"), do: :quinn, else: :macula

    if kind == :quinn and (env != [] or ebin != []),
      do: usage("variant #{name}: raw Quinn takes only halt_poll_ns and bin settings")

    if kind == :macula and bin != [],
      do: usage("variant #{name}: bin= names a raw-Quinn baseline; macula_quic takes ebin=")

    bin = one_path(name, "bin", bin, &executable/1, &"#{&1} is not an executable file")
    ebin = one_path(name, "ebin", ebin, &build_ebin/1, &"no macula_quic build in #{&1}")
    %{name: name, kind: kind, env: env, host: Map.new(host), ebin: ebin, bin: bin}
  end

  # A variant's `key=PATH` setting (given at most once), resolved by `resolve` (nil when the
  # path is not what it should be, which stops the run with `why.(path)`); nil when not given.
  defp one_path(_name, _key, [], _resolve, _why), do: nil

  defp one_path(name, _key, [{_, path}], resolve, why),
    do: resolve.(path) || usage("variant #{name}: #{why.(path)}")

  defp one_path(name, key, _more, _resolve, _why),
    do: usage("variant #{name}: one #{key}= at most")

  defp executable(path) do
    path = Path.expand(path)

    case File.stat(path) do
      {:ok, %{type: :regular, mode: mode}} when Bitwise.band(mode, 0o111) != 0 -> path
      _ -> nil
    end
  end

  # How the report names a variant's own build: the commit bench/build_rev.sh wrote beside it,
  # else the directory.
  defp build_setting(%{bin: bin}) when bin != nil, do: [{"bin", bin}]
  defp build_setting(%{ebin: nil}), do: []

  defp build_setting(%{ebin: ebin}) do
    case File.read(Path.join([ebin, "..", "REVISION"])) do
      {:ok, sha} -> [{"build", String.slice(String.trim(sha), 0, 12)}]
      {:error, _} -> [{"ebin", ebin}]
    end
  end

  # The ebin directory of a build: `dir` itself, or `dir/macula_quic/ebin` (bench/build_rev.sh's
  # and bench/build.sh's layout); nil when neither holds the app.
  defp build_ebin(dir) do
    [dir, Path.join([dir, "macula_quic", "ebin"])]
    |> Enum.map(&Path.expand/1)
    |> Enum.find(&File.exists?(Path.join(&1, "macula_quic.app")))
  end

  defp usage(msg) do
    IO.puts(
      :stderr,
      "bin/rounds: #{msg}\nusage: bin/rounds WORKLOAD VARIANT... (see bench/rounds.exs)"
    )

    System.halt(2)
  end

  defp measure(ctx, %{kind: :quinn} = variant),
    do: Bench.Workloads.quinn(ctx.workload, variant.bin || ctx.quinn, ctx.cert)

  defp measure(ctx, %{kind: :macula, env: env} = variant) do
    one = Path.expand("one.exs", __DIR__)
    argv = ["-pa", variant.ebin || ctx.ebin, one, ctx.workload, ctx.cert_dir]

    case System.cmd("elixir", argv, env: env, stderr_to_stdout: true) do
      {out, 0} ->
        case Regex.run(~r/^RESULT ([0-9.e+-]+)$/m, out) do
          [_, x] -> elem(Float.parse(x), 0)
          _ -> raise "bench/one.exs printed no result: #{out}"
        end

      {out, status} ->
        raise "bench/one.exs #{ctx.workload} with #{inspect(env)} failed (#{status}): #{out}"
    end
  end

  defp set_host(%{"halt_poll_ns" => ns}) do
    case File.write(Bench.Util.halt_poll_file(), ns) do
      :ok ->
        :ok

      {:error, e} ->
        raise "cannot set #{Bench.Util.halt_poll_file()} (#{:file.format_error(e)}): needs root and a haltpoll guest"
    end
  end

  defp set_host(_), do: :ok

  defp read_halt_poll do
    case File.read(Bench.Util.halt_poll_file()) do
      {:ok, s} ->
        String.trim(s)

      {:error, e} ->
        raise "cannot read #{Bench.Util.halt_poll_file()} (#{:file.format_error(e)}): not a haltpoll guest?"
    end
  end

  # Per variant: median, lowest, highest, and (with a quinn variant) the median of its ratio to
  # the quinn measurement of the same round: the last quinn variant listed before it (so that
  # `quinn0:halt_poll_ns=0 off:halt_poll_ns=0 quinn1:halt_poll_ns=200000 on:…` pairs each host
  # setting with its own baseline), or the first one listed.
  defp summarize(workload, variants, results) do
    unit = Bench.Workloads.unit(workload)

    firsts = %{
      macula: Enum.find(variants, &(&1.kind == :macula)),
      quinn: Enum.find(variants, &(&1.kind == :quinn))
    }

    for {v, i} <- Enum.with_index(variants) do
      xs = Enum.map(results, & &1[v.name])
      quinn = baseline_for(variants, i)

      ratio =
        if quinn && v.kind == :macula,
          do: results |> Enum.map(&(&1[v.name] / &1[quinn.name])) |> median()

      %{
        variant: v.name,
        settings:
          Enum.map_join(v.env ++ Map.to_list(v.host) ++ build_setting(v), " ", fn {k, x} ->
            "#{k}=#{x}"
          end),
        unit: unit,
        median: median(xs),
        lowest: Enum.min(xs),
        highest: Enum.max(xs),
        vs_quinn: ratio,
        baseline: quinn && quinn.name,
        paired: paired(v, firsts[v.kind], results)
      }
    end
  end

  # A variant against the first one of its kind listed (macula_quic, or raw Quinn: builds of the
  # baseline), round by round: the median of their ratio and in how many rounds this one was
  # higher (nil for the first of each kind).
  defp paired(%{name: name}, %{name: first}, results) when name != first do
    ratios = Enum.map(results, &(&1[name] / &1[first]))
    %{against: first, median: median(ratios), higher: Enum.count(ratios, &(&1 > 1))}
  end

  defp paired(_variant, _first, _results), do: nil

  defp baseline_for(variants, i) do
    quinns = for {v, j} <- Enum.with_index(variants), v.kind == :quinn, do: {v, j}

    case Enum.filter(quinns, fn {_, j} -> j < i end) do
      [] -> with [{v, _} | _] <- quinns, do: v, else: (_ -> nil)
      before -> before |> List.last() |> elem(0)
    end
  end

  # The summary table, then every round's figures (see per_round/2).
  defp report(workload, m, summary, results) do
    markdown(workload, length(results), m, summary) <> "\n" <> per_round(summary, results)
  end

  defp markdown(workload, rounds, m, summary) do
    head = """
    #{workload}, #{rounds} interleaved round(s), a fresh OS process per measurement; #{m.nproc} CPUs (#{m.cpu_model}), Linux #{m.kernel}, cpuidle #{m.cpuidle}; OTP #{m.otp}, Elixir #{m.elixir}, Quinn #{m.quinn}.

    | variant | settings | median | lowest–highest | vs raw Quinn in the same round (median) | paired: vs the first variant of its kind (macula_quic or raw Quinn) in the same round (median; higher in) |
    |---|---|---:|---:|---:|---:|
    """

    rows =
      for s <- summary do
        ratio =
          if s.vs_quinn,
            do: "#{:erlang.float_to_binary(s.vs_quinn, decimals: 2)}× of #{s.baseline}",
            else: "–"

        settings = if s.settings == "", do: "defaults", else: "`#{s.settings}`"

        paired =
          case s.paired do
            nil ->
              "–"

            p ->
              "#{:erlang.float_to_binary(p.median, decimals: 3)} of #{p.against}; " <>
                "higher in #{p.higher} of #{rounds}"
          end

        "| #{s.variant} | #{settings} | #{fmt(s.median)} #{s.unit} | #{fmt(s.lowest)}–#{fmt(s.highest)} | #{ratio} | #{paired} |\n"
      end

    head <> Enum.join(rows)
  end

  # Every round's measurements, one row per round and a column per variant, then each
  # variant's median and (for macula_quic variants with a baseline) its median ratio to it,
  # as the summary has them: the table bench/results/*.md show.
  defp per_round(summary, results) do
    names = Enum.map(summary, & &1.variant)

    head =
      "| round | #{Enum.join(names, " | ")} |\n|---|#{String.duplicate("---:|", length(names))}\n"

    rows =
      for {row, r} <- Enum.with_index(results, 1) do
        "| #{r} | #{Enum.map_join(names, " | ", &fmt(row[&1]))} |\n"
      end

    medians =
      Enum.map_join(summary, " | ", fn
        %{vs_quinn: nil} = s -> fmt(s.median)
        s -> "#{fmt(s.median)} (#{:erlang.float_to_binary(s.vs_quinn, decimals: 2)}×)"
      end)

    head <> Enum.join(rows) <> "| **median** | #{medians} |\n"
  end

  defp env_int(var, default) do
    case System.get_env(var) do
      nil ->
        default

      s ->
        with {n, ""} when n > 0 <- Integer.parse(s),
             do: n,
             else: (_ -> usage("#{var} must be a positive integer"))
    end
  end

  defp ebin do
    System.get_env("BENCH_EBIN") || Path.expand("../_build/bench/lib/macula_quic/ebin", __DIR__)
  end
end

Bench.Rounds.main(System.argv())
