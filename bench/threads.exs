# Which threads of this VM sleep, get preempted and use the CPU during a workload: the kernel's
# per-thread counters (/proc/self/task/*/status and stat), read before and after the measured
# run, per unit of work and by kind of thread. It complements bin/profile (which samples with
# perf and counts all context switches): these counters tell a thread going to sleep
# ("voluntary") from one preempted while it still had work ("involuntary"), and work for
# :ssl and :gen_tcp too. It also gives the throughput, how many CPUs the VM kept busy (CPU
# time of all its threads over wall time) and the UDP datagrams sent per unit of work.
# bench/README.md's "Where the targets are missed: the measurements" cites it.
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/threads.exs WORKLOAD [SECONDS]
#
# WORKLOAD: macula_handshake, ssl_handshake, tcp_handshake (sequential), macula_echo (64 B,
# async_send), macula_bulk (512 MiB, active), macula_passive (the same, read with recv/2). SECONDS (default 3) is the length of the timed
# workloads. bin/bench's build (or `MIX_ENV=bench MACULA_QUIC_BUILD=1 mix compile`) provides
# the ebin directory.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Code.require_file("lib/tcp.ex", __DIR__)

defmodule Bench.Threads do
  @workloads ~w(macula_handshake ssl_handshake tcp_handshake macula_echo macula_bulk macula_passive)

  def main([workload | rest]) when workload in @workloads do
    seconds =
      case rest do
        [s] -> seconds!(s)
        [] -> 3.0
      end

    # BENCH_RUNTIME_WORKERS / BENCH_RUNTIME_SPIN_US, as bin/bench takes them.
    Bench.Util.configure_runtime()
    {:ok, _} = Application.ensure_all_started(:ssl)
    dir = Path.join(System.tmp_dir!(), "macula_quic_threads_#{System.os_time()}")
    cert = Bench.Util.make_cert(dir)
    # A short warm-up run, so that loading code and starting the runtime are not counted.
    _ = run(workload, cert, 0.3, 8)
    before = snapshot()
    udp0 = udp_datagrams_sent()
    t0 = System.monotonic_time(:microsecond)
    {units, unit} = run(workload, cert, seconds, 512)
    wall_s = (System.monotonic_time(:microsecond) - t0) / 1.0e6
    udp = udp_datagrams_sent() - udp0
    report(workload, units, unit, wall_s, udp, before, snapshot())
    File.rm_rf(dir)
  end

  def main(_), do: usage()

  # "5" and "2.5" both: a whole number of seconds is the common way to write it.
  defp seconds!(s), do: Bench.Util.seconds_arg(s) || usage()

  defp usage do
    IO.puts(:stderr, "usage: elixir bench/threads.exs #{Enum.join(@workloads, "|")} [SECONDS]")
    System.halt(2)
  end

  defp run("macula_handshake", cert, s, _),
    do: {Bench.Macula.handshake(cert, 1, s).handshakes, "handshake"}

  defp run("ssl_handshake", cert, s, _),
    do: {Bench.Tcp.handshake(:ssl, cert, 1, s).handshakes, "handshake"}

  defp run("tcp_handshake", cert, s, _),
    do: {Bench.Tcp.handshake(:gen_tcp, cert, 1, s).handshakes, "handshake"}

  defp run("macula_echo", cert, s, _),
    do: {Bench.Macula.echo(cert, 64, s, :async_send).round_trips, "round trip"}

  defp run("macula_bulk", cert, _, mib), do: bulk(cert, mib, :active)
  defp run("macula_passive", cert, _, mib), do: bulk(cert, mib, :passive)

  defp bulk(cert, mib, mode) do
    r = Bench.Macula.bulk(cert, mib * Bench.Util.mib(), mode)
    {r.bytes / Bench.Util.mib(), "MiB"}
  end

  # The host's UDP OutDatagrams (/proc/net/snmp): on a quiet host, the datagrams the workload
  # sent, to compare with raw Quinn's for the same work.
  defp udp_datagrams_sent do
    lines = "/proc/net/snmp" |> File.read!() |> String.split("\n")
    [names, values] = Enum.filter(lines, &String.starts_with?(&1, "Udp: ")) |> Enum.take(2)
    fields = Enum.zip(String.split(names), String.split(values)) |> Map.new()
    String.to_integer(fields["OutDatagrams"])
  end

  # thread id => {kind, voluntary switches, involuntary switches, CPU clock ticks}
  defp snapshot do
    for tid <- File.ls!("/proc/self/task"), into: %{} do
      base = "/proc/self/task/#{tid}"
      comm = base |> Path.join("comm") |> File.read!() |> String.trim()
      status = File.read!(Path.join(base, "status"))
      [_, vol] = Regex.run(~r/\nvoluntary_ctxt_switches:\s+(\d+)/, status)
      [_, invol] = Regex.run(~r/\nnonvoluntary_ctxt_switches:\s+(\d+)/, status)

      {tid,
       {Bench.Util.thread_kind(comm), String.to_integer(vol), String.to_integer(invol),
        Bench.Util.cpu_ticks(Path.join(base, "stat"))}}
    end
  end

  defp report(workload, units, unit, wall_s, udp, before, now) do
    # Clock ticks are 10 ms on Linux (USER_HZ 100); shown as µs per unit.
    us_per_tick = 10_000

    # {kind, voluntary switches, involuntary switches, ticks} over the run, by kind of thread.
    totals =
      now
      |> Enum.map(fn {tid, {kind, v, nv, t}} ->
        {_, v0, nv0, t0} = Map.get(before, tid, {kind, 0, 0, 0})
        {kind, {v - v0, nv - nv0, t - t0}}
      end)
      |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
      |> Enum.map(fn {kind, deltas} ->
        {v, nv, t} =
          Enum.reduce(deltas, {0, 0, 0}, fn {a, b, c}, {x, y, z} -> {x + a, y + b, z + c} end)

        {kind, v, nv, t}
      end)
      |> Enum.sort()

    # How much of the host the VM used: a workload that leaves CPUs idle is held up by waits
    # (wake-ups, hand-offs), not by the work itself.
    busy =
      Enum.reduce(totals, 0, fn {_, _, _, t}, acc -> acc + t end) * us_per_tick / 1.0e6 / wall_s

    IO.write("""

    #{workload}: #{Bench.Util.fmt(units * 1.0)} #{unit}s in #{Bench.Util.fmt(wall_s)} s \
    (#{Bench.Util.fmt(units / wall_s)} per second), the VM's threads busy \
    #{Bench.Util.fmt(busy)} of #{Bench.Util.cpus()} CPUs; per #{unit}:

    | threads | went to sleep | preempted | CPU µs |
    |---|---:|---:|---:|
    """)

    for {kind, v, nv, t} <- totals, v + nv + t > 0 do
      cells = Enum.map([v / units, nv / units, t * us_per_tick / units], &Bench.Util.fmt/1)
      IO.puts("| #{kind} | #{Enum.join(cells, " | ")} |")
    end

    # The host's counter: on a quiet host, what this workload sent.
    if udp > 0,
      do:
        IO.puts(
          "\nUDP datagrams sent (the whole host): #{Bench.Util.fmt(udp / units)} per #{unit}"
        )
  end
end

Bench.Threads.main(System.argv())
