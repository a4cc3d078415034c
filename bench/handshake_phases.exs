# Where a sequential handshake's time goes, phase by phase, in macula_quic and in raw Quinn: a
# timeline from uprobes on the TLS state machine's steps (rustls's functions, the same code in
# the NIF and in the baseline), so the two can be compared step by step. The handshake
# benchmark is a serial chain (connect, handshake, close, connect again), so the phases add up
# to the time per handshake, and a phase that is longer in macula_quic is where its gap is.
# (bench/README.md, "Handshakes: the phases of one handshake".) Run it with bin/phases, which
# builds what it needs and keeps the report in bench/results/handshake-phases.md:
#
#   bin/phases                 # 3 interleaved runs of 2 s of sequential handshakes each
#   PHASES_REPEAT=5 bin/phases   # runs of each side, pooled (default 3)
#   BENCH_RUNTIME_SPIN_US=0 bin/phases   # macula_quic's runtime settings, as bin/bench takes them
#
# A cycle runs from one ClientHello to the next; the phases in it:
#   1. the ClientHello built -> the server takes it (the client's Initial sent and read, the
#      listener's endpoint accepting it)
#   2. the server's key exchange, signature and flight (ServerHello to its Finished)
#   3. the server's Finished -> the client takes the ServerHello (the flight sent and read)
#   4. the client's key exchange (ServerHello to EncryptedExtensions)
#   5. the client reads the certificate
#   6. the client checks the server's signature
#   7. the client's Finished -> the next ClientHello: the client's Finished sent, the
#      connection handed to the application, closed, and the next connect started
# Phases 1 and 3 are split at the first datagram sent after their start and the first one read
# after that (the sendmsg and recvmmsg tracepoints); phase 7 on both sides where Quinn makes the
# next connection (`Endpoint::connect_with`), and in macula_quic once more at its close and
# connect NIFs. Times are medians over the cycles in which every step came once and in order,
# pooled over the runs (the two sides' runs alternate: one run of each moves by ±20% on a
# shared VM). Each probe costs both sides a microsecond or two. Needs perf and root (uprobes);
# the probes are removed at the end, also when a step fails.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Code.require_file("lib/perf.ex", __DIR__)

defmodule Bench.HandshakePhases do
  import Bench.Util, only: [progress: 1, fmt: 1]

  @group "macula_quic_phases"

  # The steps, in the order a handshake takes them: {probe name, regex on the mangled symbol}.
  # rustls names the function that builds every ClientHello `emit_client_hello_for_retry`.
  @state "\\$u20\\$as\\$u20\\$rustls\\.\\.common_state\\.\\.State.*6handle17h"
  @steps [
    {"ch", ~r/6client2hs27emit_client_hello_for_retry17h/},
    {"sch", Regex.compile!("server\\.\\.hs\\.\\.ExpectClientHello" <> @state)},
    {"sfl", ~r/12client_hello19emit_finished_tls1317h/},
    {"csh", Regex.compile!("client\\.\\.hs\\.\\.ExpectServerHello" <> @state)},
    {"cee", Regex.compile!("client\\.\\.tls13\\.\\.ExpectEncryptedExtensions" <> @state)},
    {"ccv", Regex.compile!("client\\.\\.tls13\\.\\.ExpectCertificateVerify" <> @state)},
    {"cfin", Regex.compile!("client\\.\\.tls13\\.\\.ExpectFinished" <> @state)}
  ]

  # Where macula_quic's part of the last phase goes: probes on the bodies of its close and
  # connect NIFs (rustler runs each in a closure; connect's is the task it starts, which the
  # call polls).
  @nif_steps [
    {"close",
     ~r/^_ZN11macula_quic10connection.*nif_func7wrapper.*10conn_close28_\$u7b\$\$u7b\$closure\$u7d\$\$u7d\$17h/},
    {"connect",
     ~r/^_ZN11macula_quic10connection.*nif_func7wrapper.*7connect28_\$u7b\$\$u7b\$closure\$u7d\$\$u7d\$17h/}
  ]

  # Where the next connection begins, on both sides: Quinn's `Endpoint::connect_with`, which
  # makes the connection (its key share and ClientHello follow). Splits the last phase into the
  # hand-over of the finished connection (to a BEAM process, or to raw Quinn's task), its close
  # and the next connect's start, and the new connection's own work.
  @next_step {"cw", ~r/5quinn8endpoint8Endpoint12connect_with17h/}

  # Datagrams sent and read (the system calls' tracepoints), to split the phases that carry
  # the handshake from one end to the other.
  @syscalls ~w(syscalls:sys_enter_sendmsg syscalls:sys_exit_recvmmsg)

  # {label, from step, to step} (indices into a cycle's times: the steps, then the next
  # ClientHello at 7), and the rows that split a phase: {label, how}.
  @phases [
    {"1. ClientHello built → the server takes it", 0, 1},
    {"2. the server's key exchange, signature and flight", 1, 2},
    {"3. the server's Finished → the client takes the ServerHello", 2, 3},
    {"4. the client's key exchange", 3, 4},
    {"5. the client reads the certificate", 4, 5},
    {"6. the client checks the signature", 5, 6},
    {"7. the client's Finished → the next ClientHello (connection handed over, closed, next connect)",
     6, 7}
  ]

  @splits %{
    0 => [
      {"1a. ClientHello → the first datagram after it sent (the Initial)", {:to_tx, 0}},
      {"1b. → read from a socket", {:tx_rx, 0}},
      {"1c. → the server takes the ClientHello", {:rx_to, 0, 1}}
    ],
    2 => [
      {"3a. the server's Finished → the first datagram after it sent", {:to_tx, 2}},
      {"3b. → read from a socket", {:tx_rx, 2}},
      {"3c. → the client takes the ServerHello", {:rx_to, 2, 3}}
    ],
    # The last phase, split where the next connection is made; in macula_quic the first part
    # once more at its close and connect NIFs (indices 8 and 9 in its cycles, `connect_with`
    # at 10).
    6 => [
      {"7a. the client's Finished → the next connection made (Quinn's `connect_with`): the connection handed to its caller, closed, the next connect started",
       {:to_next, 6}},
      {"7a-1. (macula_quic) → `close_connection/1`'s NIF: the connection's answer sent, its process woken, `connect/4` returned",
       {:macula, 6, 8}},
      {"7a-2. (macula_quic) → `connect/4`'s task: the close, and the next `connect/4` up to its NIF's task",
       {:macula, 8, 9}},
      {"7a-3. (macula_quic) → `connect_with`: the task finds the client endpoint and calls Quinn",
       {:macula, 9, 10}},
      {"7b. → the next ClientHello: the new connection, its key share and ClientHello",
       {:from_next, 7}}
    ]
  }

  @seconds 2.0

  def main([dir]) do
    cert = Bench.Util.make_cert(Path.join(dir, "cert"))
    quinn = Path.join(dir, "quinn_baseline")
    nif = Path.join(dir, "macula_quic/priv/native/libmacula_quic.so")

    Bench.Util.configure_runtime()

    Bench.Perf.with_probes(@group, fn ->
      for {tag, bin, steps} <- [
            {"m", nif, @steps ++ @nif_steps ++ [@next_step]},
            {"q", quinn, @steps ++ [@next_step]}
          ] do
        Bench.Perf.add_probes(@group, bin, for({name, re} <- steps, do: {"#{tag}_#{name}", re}))
      end

      progress("macula_quic: warm-up")
      _ = Bench.Macula.handshake(cert, 1, 0.3)
      n = String.to_integer(System.get_env("PHASES_REPEAT", "3"))

      runs =
        for i <- 1..n do
          {macula(cert, dir, i, n), baseline(cert, quinn, dir, i, n)}
        end

      {mine, theirs} = Enum.unzip(runs)
      text = report(mine, theirs)
      IO.puts(text)
      File.write!(Path.join(dir, "report.md"), text <> "\n")
    end)
  end

  def main(_) do
    IO.puts(:stderr, "usage: bin/phases")
    System.halt(2)
  end

  # One run of each side: {handshakes/s under the probes, cycles}.
  defp macula(cert, dir, i, n) do
    out = Path.join(dir, "macula.data")
    Bench.Util.set_marker(Bench.Perf.attach(record_args("m", out), dir))
    progress("run #{i} of #{n}: macula_quic, #{@seconds} s of sequential handshakes")
    r = Bench.Macula.handshake(cert, 1, @seconds)
    {r.hs_s, cycles(out, @nif_steps ++ [@next_step], :macula)}
  end

  defp baseline(cert, quinn, dir, i, n) do
    progress("run #{i} of #{n}: raw Quinn, #{@seconds} s of sequential handshakes")
    out = Path.join(dir, "quinn.data")
    args = ["handshake", "cert=#{cert.certfile}", "key=#{cert.keyfile}", "seconds=#{@seconds}"]
    {json, 0} = System.cmd("perf", record_args("q", out) ++ ["--", quinn | args])
    {Bench.Util.parse_last_json(json).hs_s, cycles(out, [@next_step], :quinn)}
  end

  defp record_args(tag, out),
    do: ~w(record -q -e #{@group}:#{tag}_* -o #{out}) ++ Enum.flat_map(@syscalls, &["-e", &1])

  # The cycles in perf's record: for each, the times (µs) of the steps in order, of the next
  # ClientHello and of the `extra` steps (in their order, after the Finished), and the datagrams
  # sent and read meanwhile ({time, :tx | :rx, thread name}), and which side's (`:macula` or
  # `:quinn`). A cycle counts only if each step came once, in order.
  defp cycles(file, extra, side) do
    {out, 0} =
      System.cmd("perf", ~w(script -i #{file} -F comm,time,event,trace), stderr_to_stdout: true)

    names = Enum.map(@steps ++ extra, &elem(&1, 0))

    out
    |> String.split("\n")
    |> Enum.flat_map(&event/1)
    |> Enum.chunk_while(
      [],
      fn
        {_, "ch", _} = e, acc -> {:cont, Enum.reverse(acc), [e]}
        e, acc -> {:cont, [e | acc]}
      end,
      fn acc -> {:cont, Enum.reverse(acc), []} end
    )
    |> Enum.chunk_every(2, 1, :discard)
    |> Enum.flat_map(fn [events, [{next, "ch", _} | _]] ->
      {steps, io} = Enum.split_with(events, fn {_, name, _} -> is_binary(name) end)

      if Enum.map(steps, &elem(&1, 1)) == names do
        {main, nifs} = steps |> Enum.map(&elem(&1, 0)) |> Enum.split(length(@steps))
        # (`@next_step` is the last of `extra` on both sides.)
        [%{t: List.to_tuple(main ++ [next] ++ nifs), io: io, next: List.last(nifs), side: side}]
      else
        []
      end
    end)
  end

  # One line of `perf script`: a step {time, name, thread}, a datagram sent or read {time, :tx |
  # :rx, thread}, or nothing (a read that found none, anything else).
  defp event(line) do
    case Regex.run(~r/^\s*(\S+)\s+([\d.]+):\s+(\S+):\s*(.*)$/, line) do
      [_, comm, t, ev, rest] ->
        t = String.to_float(t) * 1.0e6

        case ev do
          "#{@group}:" <> <<_tag, "_", name::binary>> -> [{t, name, comm}]
          "syscalls:sys_enter_sendmsg" -> [{t, :tx, comm}]
          "syscalls:sys_exit_recvmmsg" -> if datagrams?(rest), do: [{t, :rx, comm}], else: []
          _ -> []
        end

      nil ->
        []
    end
  end

  # recvmmsg's return value, as perf prints it: a count of datagrams, or an error (negative).
  defp datagrams?("0x" <> hex) do
    case Integer.parse(String.trim(hex), 16) do
      {n, _} -> n > 0 and n < 0x8000000000000000
      :error -> false
    end
  end

  defp datagrams?(_), do: false

  # The first datagram sent (:tx) or read (:rx) at or after `t` in a cycle: {time, thread}.
  defp first(%{io: io}, kind, t) do
    Enum.find_value(io, fn {at, k, comm} -> if k == kind and at >= t, do: {at, comm} end)
  end

  # The duration one row measures in one cycle (nil when the cycle lacks the datagram it needs).
  defp span(c, {from, to}) when is_integer(from), do: elem(c.t, to) - elem(c.t, from)

  defp span(c, {:to_next, from}), do: c.next - elem(c.t, from)
  defp span(c, {:from_next, to}), do: elem(c.t, to) - c.next

  # A step only macula_quic's cycles have (its NIFs'): nil for raw Quinn's.
  defp span(%{side: :macula} = c, {:macula, from, to}), do: elem(c.t, to) - elem(c.t, from)

  defp span(_, {:macula, _, _}), do: nil

  defp span(c, {:to_tx, from}) do
    case first(c, :tx, elem(c.t, from)) do
      {at, _} -> at - elem(c.t, from)
      nil -> nil
    end
  end

  defp span(c, {:tx_rx, from}) do
    with {tx, _} <- first(c, :tx, elem(c.t, from)), {rx, _} <- first(c, :rx, tx), do: rx - tx
  end

  defp span(c, {:rx_to, from, to}) do
    with {tx, _} <- first(c, :tx, elem(c.t, from)),
         {rx, _} <- first(c, :rx, tx),
         do: elem(c.t, to) - rx
  end

  defp report(mine, theirs) do
    {m, q} = {Enum.flat_map(mine, &elem(&1, 1)), Enum.flat_map(theirs, &elem(&1, 1))}
    row = fn label, how -> row(label, median(m, how), median(q, how)) end

    rows =
      Enum.with_index(@phases)
      |> Enum.flat_map(fn {{label, from, to}, i} ->
        [row.(label, {from, to}) | for({l, how} <- Map.get(@splits, i, []), do: row.(l, how))]
      end)

    total = {0, 7}
    {a, b} = {median(m, total), median(q, total)}
    rates = fn runs -> Enum.map_join(runs, ", ", &fmt(round(elem(&1, 0)))) end

    Enum.join(
      [
        "## The phases of one sequential handshake (median µs)",
        "",
        "#{Bench.Util.machine_line()} macula_quic's settings: #{Bench.Util.settings()}.",
        "Command: `bin/phases` (#{length(mine)} runs of each side, interleaved, pooled).",
        "macula_quic: #{length(m)} cycles, #{rates.(mine)} handshakes/s in its runs under the " <>
          "probes; raw Quinn: #{length(q)} cycles, #{rates.(theirs)} handshakes/s.",
        "The Initial left from: #{senders(m)} (macula_quic); #{senders(q)} (raw Quinn).",
        "",
        "| phase | macula_quic | raw Quinn | difference |",
        "|---|---:|---:|---:|"
      ] ++
        rows ++
        ["| **one handshake** | **#{fmt(a)}** | **#{fmt(b)}** | **#{difference(a, b)}** |"],
      "\n"
    )
  end

  # A side with no complete cycle (a step never seen) shows "–".
  defp row(label, a, b), do: "| #{label} | #{fmt(a)} | #{fmt(b)} | #{difference(a, b)} |"

  # Which threads sent the first datagram after the ClientHello: "a runtime worker 88%, …".
  defp senders(cycles) do
    sent = for c <- cycles, {_, comm} <- [first(c, :tx, elem(c.t, 0))], do: kind(comm)
    n = max(length(sent), 1)

    sent
    |> Enum.frequencies()
    |> Enum.sort_by(&(-elem(&1, 1)))
    |> Enum.map_join(", ", fn {k, c} -> "#{k} #{round(100 * c / n)}%" end)
  end

  defp kind(comm) do
    cond do
      comm =~ ~r/^\d+_scheduler$/ -> "a BEAM scheduler"
      comm in ["macula_quic", "tokio-rt-worker"] -> "a runtime worker"
      true -> comm
    end
  end

  # The median over the cycles that have what `how` measures; nil when none has.
  defp median(cycles, how) do
    case cycles |> Enum.map(&span(&1, how)) |> Enum.reject(&is_nil/1) do
      [] -> nil
      ds -> round(Bench.Util.median(ds))
    end
  end

  defp difference(a, b) when is_integer(a) and is_integer(b) and a >= b, do: "+" <> fmt(a - b)
  defp difference(a, b) when is_integer(a) and is_integer(b), do: "−" <> fmt(b - a)
  defp difference(_, _), do: ""
end

Bench.HandshakePhases.main(System.argv())
