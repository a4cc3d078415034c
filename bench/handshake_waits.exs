# Where a sequential handshake's datagrams wait. A process that connects (or closes) sends its
# datagram from its own scheduler (see README, "How the work is scheduled"); a runtime worker
# then reads it from the listener's socket. This traces, with perf's tracepoints, the system
# calls that send and receive datagrams and the runtime workers' wake-ups during a short run of
# sequential connect + close, and sorts each datagram a scheduler sent by what the runtime
# was doing until a worker read it:
#
#   - asleep: a worker had to be woken, and no runtime thread sent anything meanwhile (the wait
#     is a wake-up);
#   - busy: a runtime thread sent other datagrams first (the wait is other work done before it);
#   - neither: no worker was woken and none sent (a worker was up, doing work that sends
#     nothing).
#
# bench/README.md's "Where the targets are missed: the measurements" cites it.
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/handshake_waits.exs [SECONDS]
#
# SECONDS (default 0.2) is the traced run. Needs perf and access to tracepoints (root, or
# kernel.perf_event_paranoid <= -1 with tracefs readable). bin/bench's build (or
# `MIX_ENV=bench MACULA_QUIC_BUILD=1 mix compile`) provides the ebin directory.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Code.require_file("lib/perf.ex", __DIR__)

defmodule Bench.HandshakeWaits do
  import Bench.Util, only: [progress: 1]

  @events ~w(syscalls:sys_enter_sendmsg syscalls:sys_enter_recvmmsg syscalls:sys_exit_recvmmsg
             sched:sched_wakeup)

  def main(args) do
    seconds =
      case args do
        [s] -> Bench.Util.seconds_arg(s) || usage()
        [] -> 0.2
        _ -> usage()
      end

    Bench.Util.configure_runtime()
    dir = Path.join(System.tmp_dir!(), "macula_quic_hs_waits_#{System.os_time()}")
    File.mkdir_p!(dir)
    cert = Bench.Util.make_cert(dir)
    progress("warm-up")
    _ = Bench.Macula.handshake(cert, 1, 0.3)
    data = Path.join(dir, "perf.data")
    events = Enum.flat_map(@events, &["-e", &1])
    Bench.Util.set_marker(Bench.Perf.attach(["record", "--quiet" | events] ++ ["-o", data], dir))
    progress("sequential handshakes for #{seconds} s under perf")
    r = Bench.Macula.handshake(cert, 1, seconds)

    {out, 0} =
      System.cmd("perf", ~w(script -i #{data} -F comm,tid,time,event,trace),
        stderr_to_stdout: true
      )

    File.rm_rf!(dir)
    report(r, out |> String.split("\n") |> Enum.flat_map(&parse/1))
  end

  defp usage do
    IO.puts(:stderr, "usage: elixir bench/handshake_waits.exs [SECONDS]")
    System.halt(2)
  end

  # {time_us, kind, tid, event}; kind is :scheduler, :runtime or :other.
  defp parse(line) do
    case Regex.run(~r/^\s*(\S+)\s+(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$/, line) do
      [_, comm, tid, t, event, rest] ->
        [{String.to_float(t) * 1.0e6, kind(comm), tid, event(event, rest)}]

      _ ->
        []
    end
  end

  # Threads by name, as bin/profile and bench/threads.exs tell them apart.
  defp kind(comm) do
    case Bench.Util.thread_kind(comm) do
      "runtime workers" -> :runtime
      "BEAM schedulers" -> :scheduler
      _ -> :other
    end
  end

  defp event("syscalls:sys_enter_sendmsg", rest), do: {:send, fd(rest)}
  defp event("syscalls:sys_enter_recvmmsg", rest), do: {:recv_start, fd(rest)}

  defp event("syscalls:sys_exit_recvmmsg", rest) do
    # A negative result (no datagram) prints as a large hexadecimal number.
    case Integer.parse(String.trim_leading(String.trim(rest), "0x"), 16) do
      {n, _} when n < 1024 -> {:received, n}
      _ -> {:received, 0}
    end
  end

  defp event("sched:sched_wakeup", rest) do
    woken = with [_, comm] <- Regex.run(~r/comm=(\S+)/, rest), do: kind(comm)
    {:wakeup, woken == :runtime}
  end

  defp event(_, _), do: :other

  defp fd(rest) do
    case Regex.run(~r/fd: (0x[0-9a-f]+)/, rest) do
      [_, hex] -> String.to_integer(String.trim_leading(hex, "0x"), 16)
      _ -> nil
    end
  end

  defp report(r, events) do
    events = List.to_tuple(events)
    n = tuple_size(events)

    waits =
      for i <- 0..(n - 1)//1,
          {t, :scheduler, _, {:send, fd}} <- [elem(events, i)],
          wait = wait(events, i + 1, n, fd, %{}, false, false),
          wait != nil,
          do: {t, wait}

    by_class =
      Enum.group_by(waits, fn
        {_, {_, true, false}} -> :asleep
        {_, {_, false, false}} -> :neither
        _ -> :busy
      end)

    [asleep, busy, neither] = Enum.map([:asleep, :busy, :neither], &Map.get(by_class, &1, []))
    listener = Enum.count(busy, fn {_, {_, _, sent}} -> sent == :listener end)

    IO.puts("""
    #{r.handshakes} sequential handshakes in #{Float.round(r.seconds, 2)} s (#{round(r.hs_s)}/s under perf)
    datagrams sent from a scheduler and then read from another socket by a runtime worker: #{length(waits)}
      worker asleep (woken, nothing else sent meanwhile): #{summary(asleep)}
      runtime busy (other datagrams sent first):           #{summary(busy)}
        of which the runtime sent from the other socket (the listener's side): #{listener}
      neither (no wake-up, nothing sent):                  #{summary(neither)}
    """)
  end

  # From event i on: the first datagram a runtime worker reads from a socket other than
  # `from_fd` (the sender's own). `recv_fd` maps a thread to the socket of its pending
  # recvmmsg. Returns {time read, a worker was woken, what a runtime thread sent meanwhile:
  # false, :caller (only from the sender's socket) or :listener (also from another)} or nil.
  defp wait(_events, i, n, _from_fd, _recv_fd, _woken, _sent) when i >= n, do: nil

  defp wait(events, i, n, from_fd, recv_fd, woken, sent) do
    case elem(events, i) do
      {_, :runtime, tid, {:recv_start, fd}} ->
        wait(events, i + 1, n, from_fd, Map.put(recv_fd, tid, fd), woken, sent)

      {t, :runtime, tid, {:received, k}} when k > 0 ->
        fd = Map.get(recv_fd, tid)

        if fd != nil and fd != from_fd,
          do: {t, woken, sent},
          else: wait(events, i + 1, n, from_fd, recv_fd, woken, sent)

      {_, :runtime, _, {:send, fd}} ->
        # Which side sent meanwhile: `:listener` when any send came from another socket.
        side = if fd != from_fd or sent == :listener, do: :listener, else: :caller
        wait(events, i + 1, n, from_fd, recv_fd, woken, side)

      {_, _, _, {:wakeup, true}} ->
        wait(events, i + 1, n, from_fd, recv_fd, true, sent)

      _ ->
        wait(events, i + 1, n, from_fd, recv_fd, woken, sent)
    end
  end

  defp summary([]), do: "0"

  defp summary(waits) do
    {t0s, results} = Enum.unzip(waits)

    us =
      Enum.zip_with(t0s, results, fn t0, {t1, _, _} -> t1 - t0 end)
      |> Enum.sort()
      |> List.to_tuple()

    p = fn q -> round(Bench.Util.percentile(us, q)) end
    "#{tuple_size(us)}, median #{p.(50)} µs (p25 #{p.(25)}, p75 #{p.(75)})"
  end
end

Bench.HandshakeWaits.main(System.argv())
