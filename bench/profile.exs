# Where the CPU goes: one workload through macula_quic and through raw Quinn, under a profiler,
# with the cost split by component (our crate, Quinn, TLS/crypto, tokio, the BEAM, the kernel,
# memcpy, malloc) and given per unit of work (per MiB moved, per round trip, per handshake).
# Run it with bin/profile, which builds what it needs and calls the steps below in order:
#
#   elixir bench/profile.exs macula WORKLOAD DIR   # macula_quic's side; profiles only the
#                                                  # measured region (after a warm-up run)
#   elixir bench/profile.exs quinn WORKLOAD DIR    # the raw-Quinn baseline under perf
#   elixir bench/profile.exs report WORKLOAD DIR   # the table (stdout and DIR/report.md)
#
# WORKLOAD is bulk (active receiver), passive (the same transfer read with recv/2; raw Quinn
# runs its one bulk workload for both), echo (64 B, async_send) handshake (sequential) or handshake16 (16
# connecting processes at once).
# The tool is perf: CPU time from sampling every thread of the process at PROFILE_FREQ Hz
# (default 2000), and every context switch of those threads (a thread going to sleep, to be
# woken later, or being preempted: costs the CPU columns show as "kernel" and "BEAM").
# BENCH_QUINN is the baseline binary (set by bin/profile). macula_quic's runtime settings come
# from bin/bench's variables (BENCH_RUNTIME_WORKERS, BENCH_RUNTIME_SPIN_US,
# BENCH_INLINE_WATCH_US), so a profile can be taken at the settings a bench run used.
#
# Instruction counts (valgrind's callgrind), which do not move with the machine's noise, are
# bin/instructions' (bench/instructions.exs): OTP 25's JIT does not run under valgrind, so that
# tool runs the BEAM's interpreter flavour, built by bench/build_emu.sh.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Code.require_file("lib/perf.ex", __DIR__)

defmodule Bench.Profile do
  import Bench.Util, only: [progress: 1]

  @workloads ~w(bulk passive echo handshake handshake16)

  def main([step, workload, dir]) when workload in @workloads do
    File.mkdir_p!(dir)

    case step do
      "macula" -> macula(workload, dir)
      "quinn" -> quinn(workload, dir)
      "report" -> report(workload, dir)
    end
  end

  def main(_) do
    IO.puts(
      :stderr,
      "usage: elixir bench/profile.exs macula|quinn|report bulk|passive|echo|handshake|handshake16 DIR"
    )

    System.halt(2)
  end

  defp freq, do: String.to_integer(System.get_env("PROFILE_FREQ", "2000"))

  # CPU samples at freq() Hz, and every context switch (period 1: each one is a sample). The
  # sched:sched_switch tracepoint would also tell sleeping from preemption, but recorded this
  # way it lost 40% of the switches that `perf stat` counted; this event matched.
  defp events, do: "-F #{freq()} -e cpu-clock -e context-switches/period=1/"

  # Which run this is (bin/profile runs each side PROFILE_REPEAT times).
  defp run, do: System.get_env("PROFILE_RUN", "1")

  # Sizes: the same for both implementations.
  defp params(w) when w in ["bulk", "passive"], do: %{bytes: 512 * Bench.Util.mib()}
  defp params("echo"), do: %{size: 64, seconds: 3.0}
  defp params("handshake"), do: %{concurrency: 1, seconds: 3.0}
  defp params("handshake16"), do: %{concurrency: 16, seconds: 3.0}

  defp unit(w) when w in ["bulk", "passive"], do: "MiB"
  defp unit("echo"), do: "round trip"
  defp unit(w) when w in ["handshake", "handshake16"], do: "handshake"

  defp cert(dir), do: Bench.Util.make_cert(Path.join(dir, "cert"))

  # The settings the run departs from the defaults with, as the command's prefix ("" at the
  # defaults).
  defp settings do
    case Bench.Util.settings() do
      "defaults" -> ""
      vars -> vars <> " "
    end
  end

  ## macula_quic's side

  defp macula(workload, dir) do
    Bench.Util.configure_runtime()
    cert = cert(dir)
    p = params(workload)
    progress("macula_quic #{workload}: warm-up")
    _ = run_macula(workload, cert, warm_up(workload, p))
    Bench.Util.set_marker(perf_marker(dir))
    progress("macula_quic #{workload}: measuring under perf")
    result = run_macula(workload, cert, p)
    units = units(workload, result)
    File.write!(Path.join(dir, "macula.#{run()}.units"), "#{units}\n")
    progress("macula_quic #{workload}: #{fmt(units)} #{unit(workload)}s")
  end

  defp warm_up(w, _) when w in ["bulk", "passive"], do: %{bytes: 8 * Bench.Util.mib()}
  defp warm_up(_, p), do: %{p | seconds: 0.3}

  defp run_macula("bulk", cert, p), do: Bench.Macula.bulk(cert, p.bytes, :active)
  defp run_macula("passive", cert, p), do: Bench.Macula.bulk(cert, p.bytes, :passive)
  defp run_macula("echo", cert, p), do: Bench.Macula.echo(cert, p.size, p.seconds, :async_send)

  defp run_macula(w, cert, p) when w in ["handshake", "handshake16"],
    do: Bench.Macula.handshake(cert, p.concurrency, p.seconds)

  defp units(w, r) when w in ["bulk", "passive"], do: r.bytes / Bench.Util.mib()
  defp units("echo", r), do: r.round_trips
  defp units(w, r) when w in ["handshake", "handshake16"], do: r.handshakes

  # perf sees only the measured region (see Bench.Perf).
  defp perf_marker(dir) do
    data = Path.join(dir, "macula.#{run()}.perf.data")
    Bench.Perf.attach(~w(record --quiet #{events()} -o #{data}), dir)
  end

  ## The raw-Quinn baseline

  defp quinn(workload, dir) do
    cert = cert(dir)
    bin = System.get_env("BENCH_QUINN") || raise "BENCH_QUINN is not set (run bin/profile)"

    args =
      [quinn_workload(workload), "cert=#{cert.certfile}", "key=#{cert.keyfile}"] ++
        Enum.map(params(workload), fn {k, v} -> "#{k}=#{v}" end)

    argv =
      ~w(record --quiet #{events()} -o #{Path.join(dir, "quinn.#{run()}.perf.data")} --) ++
        [bin | args]

    progress("raw Quinn #{workload}: measuring under perf")
    {out, status} = System.cmd("perf", argv, stderr_to_stdout: true)
    if status != 0, do: raise("perf failed (#{status}): #{out}")

    r = Bench.Util.parse_last_json(out)
    units = units(workload, r)
    File.write!(Path.join(dir, "quinn.#{run()}.units"), "#{units}\n")
    progress("raw Quinn #{workload}: #{fmt(units)} #{unit(workload)}s")
  end

  # The baseline's reader takes Quinn's chunks as they come: one workload for both ways of
  # receiving.
  defp quinn_workload("passive"), do: "bulk"
  defp quinn_workload("handshake16"), do: "handshake"
  defp quinn_workload(w), do: w

  ## The report

  defp report(workload, dir) do
    {mac, msw, mu, mruns} = pooled(dir, "macula")
    {q, qsw, qu, qruns} = pooled(dir, "quinn")
    per = fn costs, units, c -> Map.get(costs, c, 0) / units end
    u = unit(workload)

    rows =
      for c <- Bench.Util.components(), Map.get(mac, c, 0) + Map.get(q, c, 0) > 0 do
        m = per.(mac, mu, c)
        b = per.(q, qu, c)
        "| #{c} | #{fmt(m)} | #{fmt(b)} | #{fmt(m - b)} |"
      end

    mt = Enum.sum(Map.values(mac)) / mu
    qt = Enum.sum(Map.values(q)) / qu

    range = fn runs -> "#{fmt(Enum.min(runs))}–#{fmt(Enum.max(runs))}" end
    date = DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601()

    md = """
    ## Profile: #{workload} (perf, CPU µs per #{u})

    #{date}. #{Bench.Util.machine_line()}
    Command: `#{settings()}bin/profile #{workload}` (#{length(mruns)} runs of each side, interleaved, pooled).
    macula_quic: #{fmt(mu)} #{u}s, per-run totals #{range.(mruns)} µs; raw Quinn: #{fmt(qu)} #{u}s,
    per-run totals #{range.(qruns)} µs.

    | component | macula_quic | raw Quinn | difference |
    |---|---:|---:|---:|
    #{Enum.join(rows, "\n")}
    | **total** | **#{fmt(mt)}** | **#{fmt(qt)}** | **#{fmt(mt - qt)}** (#{fmt(mt / max(qt, 1.0e-9))}×) |

    CPU time of every thread of the process (both ends of the connection live in it): BEAM
    schedulers, dirty schedulers, tokio workers. A scheduler busy-waiting for work counts; idle
    time does not. "kernel" includes system calls, context switches and wake-ups.

    | context switches per #{u} | macula_quic | raw Quinn |
    |---|---:|---:|
    #{Enum.map_join(Bench.Util.thread_kinds(), "\n", fn kind -> "| #{kind} | #{fmt(Map.get(msw, kind, 0) / mu)} | #{fmt(Map.get(qsw, kind, 0) / qu)} |" end)}
    | **total** | **#{fmt(Enum.sum(Map.values(msw)) / mu)}** | **#{fmt(Enum.sum(Map.values(qsw)) / qu)}** |

    A context switch is a thread of the process leaving its CPU: to sleep (it is woken later,
    which costs a wake-up), or preempted while it still had work. The BEAM's aux thread does
    the VM's background work; "other threads" are the rest (the main thread on raw Quinn's
    side).
    """

    File.write!(Path.join(dir, "report.md"), md)
    IO.puts("\n" <> md)
  end

  # Every run's samples and units added up (runs are interleaved, macula then Quinn, to spread
  # the host's drift over both), each run's total per unit, to show the spread, and the context
  # switches of all runs by kind of thread.
  defp pooled(dir, who) do
    runs =
      for units_file <- Path.wildcard(Path.join(dir, "#{who}.*.units")) do
        {n, _} = units_file |> File.read!() |> String.trim() |> Float.parse()
        {costs, switches} = perf_costs(String.replace_suffix(units_file, ".units", ".perf.data"))
        {costs, switches, n}
      end

    add = fn maps -> Enum.reduce(maps, %{}, &Map.merge(&2, &1, fn _, a, b -> a + b end)) end
    costs = add.(Enum.map(runs, &elem(&1, 0)))
    switches = add.(Enum.map(runs, &elem(&1, 1)))
    units = runs |> Enum.map(&elem(&1, 2)) |> Enum.sum()
    totals = Enum.map(runs, fn {c, _, n} -> Enum.sum(Map.values(c)) / n end)
    {costs, switches, units, totals}
  end

  # perf: CPU samples of every thread, as CPU microseconds per component, and the context
  # switches counted by kind of thread (Bench.Util.thread_kind/1).
  defp perf_costs(file) do
    fields = ~w(-F comm,event,ip,sym,dso)
    {out, 0} = System.cmd("perf", ~w(script -i #{file}) ++ fields, stderr_to_stdout: false)
    us_per_sample = 1.0e6 / freq()

    out
    |> String.split("\n", trim: true)
    |> Enum.reduce({%{}, %{}}, fn line, {costs, switches} = acc ->
      cond do
        m = Regex.run(~r/^\s*(.*?)\s+context-switches\S*:/, line) ->
          [_, comm] = m
          {costs, Map.update(switches, Bench.Util.thread_kind(comm), 1, &(&1 + 1))}

        m = Regex.run(~r/^\s*.*?\s+cpu-clock\S*:\s+[0-9a-f]+\s+(.*)\s+\(([^()]*)\)\s*$/, line) ->
          [_, sym, dso] = m

          {Map.update(
             costs,
             Bench.Util.component(sym, dso),
             us_per_sample,
             &(&1 + us_per_sample)
           ), switches}

        true ->
          acc
      end
    end)
  end

  defp fmt(x) when is_integer(x), do: Integer.to_string(x)
  defp fmt(x) when abs(x) >= 100, do: :erlang.float_to_binary(x * 1.0, decimals: 0)
  defp fmt(x) when abs(x) >= 10, do: :erlang.float_to_binary(x * 1.0, decimals: 1)
  defp fmt(x), do: :erlang.float_to_binary(x * 1.0, decimals: 2)
end

Bench.Profile.main(System.argv())
