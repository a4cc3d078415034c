# Counts, per unit of work, the calls into Quinn and the system calls that macula_quic and raw
# Quinn make: does macula_quic do more of Quinn's work, or the same work at a higher cost?
# (bench/README.md, "Where the targets are missed".) Run it with bin/calls, which builds what
# it needs:
#
#   bin/calls echo        # 64 B echo round trips for 3 s (async_send)
#   bin/calls handshake   # sequential connect + close for 3 s
#
# Calls into Quinn are counted with uprobes (perf probe) on four functions, in the NIF and in
# the baseline binary: Quinn's connection driver and endpoint driver (each poll),
# `Connection::poll_transmit` and `Connection::handle_event`. System calls are counted with the
# kernel's tracepoints, in total and for the kinds that tell wake-ups apart. macula_quic's side
# is counted over the measured region only (perf stat attached to this VM, see Bench.Perf);
# raw Quinn's over its whole run, which adds its short warm-up (20 handshakes; echo has none).
# Needs perf and root (uprobes). The probes are removed at the end, also when a step fails.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Code.require_file("lib/perf.ex", __DIR__)

defmodule Bench.Calls do
  import Bench.Util, only: [progress: 1, fmt: 1]

  @group "macula_quic_calls"

  # {event suffix, what the table calls it, regex on the mangled symbol}
  @functions for {name, label, mangled, _} <- Bench.Util.entry_points(),
                 do: {name, label, mangled}

  @syscalls ~w(sched_yield futex epoll_wait recvmmsg sendmsg read write timerfd_settime)

  def main([workload, dir]) when workload in ~w(echo handshake) do
    cert = Bench.Util.make_cert(Path.join(dir, "cert"))
    quinn = Path.join(dir, "quinn_baseline")
    nif = Path.join(dir, "macula_quic/priv/native/libmacula_quic.so")

    Bench.Perf.with_probes(@group, fn ->
      add_probes("m", nif)
      add_probes("q", quinn)
      mine = macula(workload, cert, dir)
      theirs = baseline(workload, cert, quinn, dir)
      IO.puts(report(workload, mine, theirs))
    end)
  end

  def main(_) do
    IO.puts(:stderr, "usage: bin/calls echo|handshake")
    System.halt(2)
  end

  ## Probes

  defp add_probes(tag, binary) do
    Bench.Perf.add_probes(
      @group,
      binary,
      for({name, _, re} <- @functions, do: {"#{tag}_#{name}", re})
    )
  end

  defp events(tag) do
    Enum.map(@functions, fn {name, _, _} -> "#{@group}:#{tag}_#{name}" end) ++
      ["raw_syscalls:sys_enter" | Enum.map(@syscalls, &"syscalls:sys_enter_#{&1}")]
  end

  defp stat_args(tag, out), do: ~w(stat -x ; -o #{out}) ++ Enum.flat_map(events(tag), &["-e", &1])

  ## The two sides

  defp macula(workload, cert, dir) do
    progress("macula_quic #{workload}: warm-up")
    _ = run_macula(workload, cert, 0.3)
    out = Path.join(dir, "macula.stat")
    Bench.Util.set_marker(Bench.Perf.attach(stat_args("m", out), dir))
    progress("macula_quic #{workload}: counting")
    units = run_macula(workload, cert, 3.0)
    {units, read_stat(out, "m")}
  end

  defp run_macula("echo", cert, s), do: Bench.Macula.echo(cert, 64, s, :async_send).round_trips
  defp run_macula("handshake", cert, s), do: Bench.Macula.handshake(cert, 1, s).handshakes

  defp baseline(workload, cert, quinn, dir) do
    progress("raw Quinn #{workload}: counting")
    out = Path.join(dir, "quinn.stat")
    size = if workload == "echo", do: ["size=64"], else: []
    args = [workload, "cert=#{cert.certfile}", "key=#{cert.keyfile}", "seconds=3" | size]
    {json, 0} = System.cmd("perf", stat_args("q", out) ++ ["--", quinn | args])
    r = Bench.Util.parse_last_json(json)
    {if(workload == "echo", do: r.round_trips, else: r.handshakes), read_stat(out, "q")}
  end

  # perf stat's CSV: count;unit;event;... -> %{event => count}, the probes' tag dropped.
  defp read_stat(file, tag) do
    for line <- File.read!(file) |> String.split("\n"),
        [count, _, event | _] <- [String.split(line, ";")],
        {n, ""} <- [Integer.parse(count)],
        into: %{},
        do: {String.replace(event, "#{@group}:#{tag}_", ""), n}
  end

  ## The report

  defp report(workload, {m_units, m}, {q_units, q}) do
    unit = if workload == "echo", do: "round trip", else: "handshake"
    row = fn label, key -> "| #{label} | #{per(m, key, m_units)} | #{per(q, key, q_units)} |" end

    calls = for {name, label, _} <- @functions, do: row.(label, name)
    total = row.("**system calls**", "raw_syscalls:sys_enter")
    kinds = for s <- @syscalls, do: row.("`#{s}`", "syscalls:sys_enter_#{s}")

    Enum.join(
      [
        "## Calls per #{unit}: #{workload} (macula_quic: #{m_units} #{unit}s; raw Quinn: #{q_units})",
        "",
        "| per #{unit} | macula_quic | raw Quinn |",
        "|---|---:|---:|"
      ] ++ calls ++ [total] ++ kinds,
      "\n"
    )
  end

  defp per(counts, key, units) do
    case counts do
      %{^key => n} -> fmt(n / max(units, 1))
      _ -> "–"
    end
  end
end

Bench.Calls.main(System.argv())
