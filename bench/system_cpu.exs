# What the whole machine does during one bulk transfer: the kernel's system-wide CPU accounting
# (/proc/stat: user, system, softirq, idle and steal time, and context switches), read just
# before and just after the transfer, per MiB, for macula_quic (active mode, both ends in this
# VM, after a 64 MiB warm-up) and for raw Quinn's baseline (a child process; its own start, a
# few milliseconds, is inside its window). Unlike bin/profile and bench/threads.exs it counts
# idle time too: a transfer bound by CPU on both cores leaves little, and where one side waits
# for the other the idle time shows the bubble. Run on an otherwise idle machine: every
# process's CPU counts.
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/system_cpu.exs [SIDES [MIB [ROUNDS]]]
#
# SIDES: both (default; the sides alternate, each round starting with the next one), macula or
# quinn (one side only, e.g. under `perf stat -a` to count system calls). MIB: the transfer's
# size (default 2048). ROUNDS: default 3. The baseline is BENCH_QUINN, else cargo's release
# build of examples/quinn_baseline.rs (`bin/bench` builds both; so does `bench/build.sh DIR`).
# bench/README.md's "Allocation: glibc's arena locks, and mimalloc" cites it.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

defmodule Bench.SystemCpu do
  import Bench.Util, only: [fmt: 1, median: 1, progress: 1]

  @fields ~w(user sys softirq idle steal)a

  def main(args) do
    {sides, mib, rounds} = parse(args)
    Bench.Util.configure_runtime()
    dir = Path.join(System.tmp_dir!(), "macula_quic_system_cpu_#{System.os_time()}")
    cert = Bench.Util.make_cert(dir)
    quinn = Bench.Util.quinn_path()

    if :quinn in sides and not File.exists?(quinn) do
      raise "no raw-Quinn baseline at #{quinn}: run bin/bench once, or set BENCH_QUINN"
    end

    if :macula in sides do
      progress("warm-up: 64 MiB through macula_quic")
      _ = Bench.Macula.bulk(cert, 64 * Bench.Util.mib(), :active)
    end

    results =
      for round <- 1..rounds, side <- Bench.Util.rotate(sides, round - 1) do
        r = measure(side, cert, quinn, mib)
        progress("round #{round}/#{rounds} #{side}: #{fmt(r.mib_s)} MiB/s, #{line(r)}")
        r
      end

    report(results, mib, rounds)
    File.rm_rf(dir)
  end

  defp parse(args) do
    {sides, rest} =
      case args do
        ["both" | rest] -> {[:macula, :quinn], rest}
        ["macula" | rest] -> {[:macula], rest}
        ["quinn" | rest] -> {[:quinn], rest}
        [] -> {[:macula, :quinn], []}
        _ -> usage()
      end

    case Enum.map(rest, &Integer.parse/1) do
      [] -> {sides, 2048, 3}
      [{m, ""}] when m > 0 -> {sides, m, 3}
      [{m, ""}, {r, ""}] when m > 0 and r > 0 -> {sides, m, r}
      _ -> usage()
    end
  end

  defp usage do
    IO.puts(:stderr, "usage: elixir bench/system_cpu.exs [both|macula|quinn [MIB [ROUNDS]]]")
    System.halt(2)
  end

  defp measure(side, cert, quinn, mib) do
    bytes = mib * Bench.Util.mib()
    before = snapshot()

    mib_s =
      case side do
        :macula -> Bench.Macula.bulk(cert, bytes, :active).mib_s
        :quinn -> Bench.Util.run_quinn(quinn, "bulk", cert, bytes: bytes).mib_s
      end

    after_ = snapshot()
    # Ticks are 10 ms (USER_HZ 100): per MiB in µs.
    per_mib = Map.new(@fields, &{&1, (after_[&1] - before[&1]) * 10_000 / mib})
    Map.merge(per_mib, %{side: side, mib_s: mib_s, ctxt: (after_.ctxt - before.ctxt) / mib})
  end

  # The first line of /proc/stat (all CPUs: user nice system idle iowait irq softirq steal ...,
  # in ticks) and the context switches since boot.
  defp snapshot do
    lines = File.read!("/proc/stat") |> String.split("\n")
    ["cpu" | ticks] = lines |> hd() |> String.split()

    [user, nice, sys, idle, iowait, _irq, softirq, steal | _] =
      Enum.map(ticks, &String.to_integer/1)

    ["ctxt", ctxt] = Enum.find(lines, &String.starts_with?(&1, "ctxt ")) |> String.split()

    %{
      user: user + nice,
      sys: sys,
      softirq: softirq,
      idle: idle + iowait,
      steal: steal,
      ctxt: String.to_integer(ctxt)
    }
  end

  defp line(r),
    do:
      Enum.map_join(@fields, ", ", &"#{&1} #{fmt(r[&1])}") <>
        " µs/MiB, #{fmt(r.ctxt)} switches/MiB"

  defp report(results, mib, rounds) do
    IO.puts("""

    ## The whole machine during a bulk transfer (per MiB, median of #{rounds} rounds)

    #{Bench.Util.machine_line()}
    Command: `elixir -pa EBIN bench/system_cpu.exs` (#{mib} MiB per transfer, active mode).
    CPU time of the whole machine (all processes), µs per MiB; "busy" is user + sys + softirq.
    """)

    sides = results |> Enum.map(& &1.side) |> Enum.uniq()
    med = Map.new(sides, fn s -> {s, medians(Enum.filter(results, &(&1.side == s)))} end)
    rows = [:mib_s, :user, :sys, :softirq, :busy, :idle, :steal, :ctxt]
    ratio? = length(sides) == 2

    IO.puts(
      "| | " <>
        Enum.map_join(sides, " | ", &to_string/1) <>
        if(ratio?, do: " | macula/quinn |", else: " |")
    )

    IO.puts("|---|" <> String.duplicate("---:|", length(sides) + if(ratio?, do: 1, else: 0)))

    for row <- rows do
      values = Enum.map(sides, &med[&1][row])
      ratio = if ratio?, do: [ratio(values)], else: []
      IO.puts("| #{label(row)} | " <> Enum.map_join(values ++ ratio, " | ", &fmt/1) <> " |")
    end
  end

  defp medians(rs) do
    m = Map.new([:mib_s, :ctxt | @fields], fn k -> {k, median(Enum.map(rs, & &1[k]))} end)
    Map.put(m, :busy, median(Enum.map(rs, &(&1.user + &1.sys + &1.softirq))))
  end

  defp ratio([a, b]) when b > 0, do: :erlang.float_to_binary(a / b, decimals: 2) <> "×"
  defp ratio(_), do: nil

  defp label(:mib_s), do: "MiB/s"
  defp label(:ctxt), do: "context switches per MiB"
  defp label(:busy), do: "busy (µs/MiB)"
  defp label(k), do: "#{k} (µs/MiB)"
end

Bench.SystemCpu.main(System.argv())
