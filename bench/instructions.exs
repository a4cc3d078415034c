# Instructions per unit of work, macula_quic against raw Quinn, counted by valgrind's callgrind:
# the same workload run twice by each (a short and a long run), the counts of the short run
# taken from the long one's, and the rest divided by the extra units of work. Start-up, TLS
# set-up and warm-up cancel out. Instruction counts do not depend on what else the machine is
# doing, so they answer what CPU-time profiles on a noisy VM cannot: does macula_quic make
# Quinn execute more code, or the same code more slowly?
#
# Run it with bin/instructions (root the first time: it builds the BEAM's interpreter flavour,
# see bench/build_emu.sh), which calls the steps below:
#
#   elixir bench/instructions.exs macula WORKLOAD ARG   # run under valgrind, in the emu VM:
#                                                       # the workload, then "units=N"
#   elixir bench/instructions.exs report WORKLOAD DIR   # the table (stdout and DIR/report.md)
#
# WORKLOAD is echo (64 B round trips, async_send; ARG seconds), handshake (sequential connect +
# close with full TLS handshakes; ARG seconds) or bulk (active receiver; ARG MiB).
#
# What the counts are: user-space instructions of every thread (callgrind does not see the
# kernel). The BEAM runs its interpreter, not the JIT (valgrind cannot run OTP 25's JIT), with
# busy-waiting off (`+sbwt none +sbwtdcpu none +sbwtdio none`): a spin bounded by time runs for
# as many instructions as the slowed-down program leaves it, which would count nothing real.
# The BEAM row is therefore the interpreter's cost with those flags, not the JIT's; the rows
# for Quinn, crypto, tokio and our crate are the same machine code as in the benchmarks.
# valgrind runs one thread at a time, so timing-dependent behaviour (which thread gets a
# datagram first) differs from a real run; the report gives the calls into Quinn per unit for
# both, to show that the work done was the same, and where macula_quic's connection work ran
# (shard runs inside calls and on runtime workers, from `native_counts/0`), to show how far the
# path differs: under valgrind a runtime worker often reaches a datagram before the call that
# sent it, where in a real 64-byte echo every run is inside a call.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

defmodule Bench.Instructions do
  import Bench.Util, only: [fmt: 1]

  @workloads ~w(echo handshake bulk)

  def main(["macula", workload, arg]) when workload in @workloads do
    # bin/instructions gives the directory, so that the baseline uses the same certificate.
    dir = System.get_env("INSTRUCTIONS_CERT_DIR") || Path.join(System.tmp_dir!(), "mq_instr_cert")
    cert = Bench.Util.make_cert(dir)
    before = MaculaQuic.native_counts()
    units = run(workload, cert, arg)
    later = MaculaQuic.native_counts()
    # Shard runs over the whole run (start-up included: the short run's cancel it out).
    runs = for k <- [:inline_runs, :runtime_runs], do: "#{k}=#{later[k] - before[k]}"
    IO.puts(Enum.join(["units=#{units}" | runs], " "))
  end

  def main(["report", workload, dir]) when workload in @workloads, do: report(workload, dir)

  def main(_) do
    IO.puts(
      :stderr,
      "usage: elixir bench/instructions.exs macula WORKLOAD ARG | report WORKLOAD DIR (WORKLOAD: echo|handshake|bulk)"
    )

    System.halt(2)
  end

  defp run("echo", cert, secs),
    do: Bench.Macula.echo(cert, 64, Bench.Util.seconds_arg(secs), :async_send).round_trips

  defp run("handshake", cert, secs),
    do: Bench.Macula.handshake(cert, 1, Bench.Util.seconds_arg(secs)).handshakes

  defp run("bulk", cert, mib) do
    r = Bench.Macula.bulk(cert, String.to_integer(mib) * Bench.Util.mib(), :active)
    div(r.bytes, Bench.Util.mib())
  end

  defp unit("echo"), do: "round trip"
  defp unit("handshake"), do: "handshake"
  defp unit("bulk"), do: "MiB"

  ## The report

  @beam "BEAM (VM, JIT code, scheduler busy-wait)"
  @beam_waiting "BEAM: schedulers waiting for work (not counted)"
  @beam_work "BEAM: processes, messages, memory"

  # A scheduler out of work loops in scheduler_wait (thread progress, aux work, time checks,
  # spinning on locks) until it sleeps or work arrives. Under valgrind, which runs one thread at a time, how often
  # it loops depends on when valgrind switches threads: a short run can loop more than a long
  # one. Those loops (and the libc calls they make) get a row of their own, left out of the
  # totals.
  @waiting ~r/scheduler_wait|thr_progress|thr_prgr|aux_work|sched_(finish_)?poke|wakeup|^ethr_|clock_gettime|drift_corrected|monotonic_time|check_next_timeout|erts_check_io|erts_poll|rwmutex|proc_(un)?lock_failed|pthread_getspecific|__tls_get_addr/

  defp components do
    Enum.flat_map(Bench.Util.components(), fn
      @beam -> [@beam_work]
      c -> [c]
    end) ++ [@beam_waiting]
  end

  defp component(sym, dso) do
    if sym =~ @waiting and not (dso =~ ~r/libmacula_quic|quinn_baseline/) do
      @beam_waiting
    else
      case Bench.Util.component(sym, dso) do
        @beam -> @beam_work
        c -> c
      end
    end
  end

  defp report(workload, dir) do
    sides =
      for who <- ["macula", "quinn"], into: %{} do
        {short, short_units, short_runs} = load(dir, who, "short")
        {long, long_units, long_runs} = load(dir, who, "long")
        units = long_units - short_units
        if units <= 0, do: raise("#{who}: the long run did no more work than the short one")

        {who,
         %{
           costs: diff(long.costs, short.costs),
           calls: diff(long.calls, short.calls),
           units: units,
           runs: diff(long_runs, short_runs)
         }}
      end

    m = sides["macula"]
    q = sides["quinn"]
    u = unit(workload)

    by_component = fn side ->
      group(side.costs, fn {sym, dso} -> component(sym, dso) end)
    end

    mc = by_component.(m)
    qc = by_component.(q)
    per = fn map, side, key -> Map.get(map, key, 0) / side.units end

    rows =
      for c <- components(), Map.get(mc, c, 0) + Map.get(qc, c, 0) != 0 do
        a = per.(mc, m, c)
        b = per.(qc, q, c)
        "| #{c} | #{thousands(a)} | #{thousands(b)} | #{thousands(a - b)} |"
      end

    total = fn map, side ->
      (Enum.sum(Map.values(map)) - Map.get(map, @beam_waiting, 0)) / side.units
    end

    mt = total.(mc, m)
    qt = total.(qc, q)

    call_rows =
      for {_, label, _, re} <- Bench.Util.entry_points() do
        count = fn side -> Enum.sum(for {f, n} <- side.calls, f =~ re, do: n) / side.units end
        "| #{label} | #{fmt(count.(m) * 1.0)} | #{fmt(count.(q) * 1.0)} |"
      end

    top = fn side, comp ->
      side.costs
      |> Enum.filter(fn {{sym, dso}, _} -> Bench.Util.component(sym, dso) == comp end)
      |> Enum.sort_by(fn {_, ir} -> -ir end)
      |> Enum.take(8)
      |> Enum.map_join("\n", fn {{sym, _}, ir} ->
        "| `#{String.slice(sym, 0, 90)}` | #{thousands(ir / side.units)} |"
      end)
    end

    date = DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601()
    machine = Bench.Util.machine()

    md = """
    ## Instructions: #{workload} (callgrind, thousands of instructions per #{u})

    #{date}. Machine: #{machine.nproc} CPUs (#{machine.cpu_model}); OTP #{machine.otp} (interpreter
    flavour, busy-waiting off), Elixir #{machine.elixir}, #{machine.rustc}.
    Command: `bin/instructions #{workload}`. Counts are the long run's minus the short run's, per
    extra #{u}: macula_quic #{fmt(m.units)} #{u}s, raw Quinn #{fmt(q.units)}.

    | component | macula_quic | raw Quinn | difference |
    |---|---:|---:|---:|
    #{Enum.join(rows, "\n")}
    | **total** | **#{thousands(mt)}** | **#{thousands(qt)}** | **#{thousands(mt - qt)}** |

    | calls per #{u} | macula_quic | raw Quinn |
    |---|---:|---:|
    #{Enum.join(call_rows, "\n")}

    #{String.trim_trailing(where_runs(m, u))}

    User-space instructions of every thread (no kernel). The BEAM's are its interpreter's with
    busy-waiting off, not the JIT's (see bench/instructions.exs); the Rust rows are the same
    machine code the benchmarks run. The total leaves out the schedulers' waiting: under
    valgrind, which runs one thread at a time, how often a waiting scheduler loops depends on
    when valgrind switches threads, so that row differs from run to run (even in sign).

    Quinn's functions with the most instructions, macula_quic:

    | function | thousands per #{u} |
    |---|---:|
    #{top.(m, "Quinn")}

    and raw Quinn:

    | function | thousands per #{u} |
    |---|---:|
    #{top.(q, "Quinn")}
    """

    File.write!(Path.join(dir, "report.md"), md)
    IO.puts("\n" <> md)
  end

  defp thousands(x), do: fmt(x / 1000.0)

  # Where macula_quic's connection work ran under valgrind: shard runs inside calls and on
  # runtime workers (`native_counts/0`), per unit. The Rust rows above are the same machine code
  # as in a real run, but a run on a runtime worker takes other paths around Quinn (its runner
  # task, messages built in an environment of its own) than one inside a call.
  defp where_runs(%{runs: runs}, _u) when map_size(runs) == 0, do: ""

  defp where_runs(%{runs: runs, units: units}, u) do
    inline = Map.get(runs, "inline_runs", 0) / units
    runtime = Map.get(runs, "runtime_runs", 0) / units

    """
    Where macula_quic's connection work ran here, shard runs per #{u} (`native_counts/0`):
    #{fmt(inline)} inside calls, #{fmt(runtime)} on runtime workers. valgrind runs one thread at
    a time, so a runtime worker often reaches a datagram before the call that sent it;
    `bin/bench` reports the same counts for its real echo runs (6.00 and 0.00 per round trip in
    a 64-byte echo on 2026-11-28). Where they differ, the rows of our crate, tokio and the BEAM
    describe the path taken here, not the real run's.
    """
  end

  defp load(dir, who, len) do
    {units, runs} =
      case File.read!(Path.join(dir, "#{who}_#{len}.out")) do
        "units=" <> _ = line -> parse_units(line)
        json -> {json |> Bench.Util.parse_last_json() |> quinn_units(), %{}}
      end

    {parse(Path.join(dir, "#{who}_#{len}.cg")), units, runs}
  end

  # "units=N inline_runs=I runtime_runs=R" (the last two absent in files from before them).
  defp parse_units(line) do
    fields =
      for field <- String.split(line), [k, v] = String.split(field, "=", parts: 2), into: %{} do
        {k, String.to_integer(v)}
      end

    {Map.fetch!(fields, "units"), Map.delete(fields, "units")}
  end

  defp quinn_units(%{round_trips: n}), do: n
  defp quinn_units(%{handshakes: n}), do: n
  defp quinn_units(%{bytes: b}), do: div(b, Bench.Util.mib())

  defp diff(long, short),
    do: Map.new(long, fn {k, v} -> {k, v - Map.get(short, k, 0)} end)

  defp group(costs, key_fun) do
    Enum.reduce(costs, %{}, fn {k, v}, acc -> Map.update(acc, key_fun.(k), v, &(&1 + v)) end)
  end

  # A callgrind output file (`positions: line`, `events: Ir`, names compressed): the
  # instructions executed in each function itself (not in what it calls), keyed by
  # {function, object file}, and the calls made to each function.
  defp parse(path) do
    init = %{
      names: %{},
      ob: nil,
      fn: nil,
      callee: nil,
      call_pending: false,
      costs: %{},
      calls: %{}
    }

    path
    |> File.stream!()
    |> Enum.reduce(init, &line/2)
    |> Map.take([:costs, :calls])
  end

  defp line(l, st) do
    l = String.trim_trailing(l, "\n")

    case Regex.run(~r/^(ob|fn|cob|cfn|fl|fi|fe|cfi|cfl)=(?:\((\d+)\))?\s*(.*)$/, l) do
      [_, key, id, name] ->
        kind = if key in ~w(ob cob), do: :ob, else: if(key in ~w(fn cfn), do: :fn, else: :fl)
        {st, name} = resolve(st, kind, id, name)

        case key do
          "ob" -> %{st | ob: name}
          "fn" -> %{st | fn: name}
          "cfn" -> %{st | callee: name}
          _ -> st
        end

      nil ->
        cond do
          String.starts_with?(l, "calls=") ->
            [n | _] = l |> String.trim_leading("calls=") |> String.split()

            calls =
              Map.update(st.calls, st.callee, String.to_integer(n), &(&1 + String.to_integer(n)))

            %{st | calls: calls, call_pending: true}

          l =~ ~r/^[0-9+\-*]/ ->
            cost_line(l, st)

          true ->
            st
        end
    end
  end

  # The cost line after `calls=` is the call's inclusive cost: the callee's, not this function's.
  defp cost_line(_l, %{call_pending: true} = st), do: %{st | call_pending: false}

  defp cost_line(l, st) do
    case String.split(l) do
      [_pos, ir | _] ->
        key = {st.fn || "?", st.ob || "?"}

        %{
          st
          | costs: Map.update(st.costs, key, String.to_integer(ir), &(&1 + String.to_integer(ir)))
        }

      _ ->
        st
    end
  end

  # Names are given once as "(id) name", then as "(id)" alone.
  defp resolve(st, _kind, "", name), do: {st, name}

  defp resolve(st, kind, id, "") do
    {st, Map.get(st.names, {kind, id}, "?")}
  end

  defp resolve(st, kind, id, name), do: {%{st | names: Map.put(st.names, {kind, id}, name)}, name}
end

Bench.Instructions.main(System.argv())
