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
#   1. the ClientHello built -> the server takes it (the client's Initial sent and received,
#      the listener's endpoint accepting it)
#   2. the server's key exchange, signature and flight (ServerHello to its Finished)
#   3. the server's flight -> the client takes it (sent, received, decrypted)
#   4. the client reads the certificate
#   5. the client checks the server's signature
#   6. the client's Finished -> the next ClientHello: the client's Finished sent, the
#      connection handed to the application, closed, and the next connect started
# Times are medians over the cycles in which every step came once and in order, pooled over
# the runs (the two sides' runs alternate: one run of each moves by ±20% on a shared VM). Each
# probe costs both sides a microsecond or two. Needs perf and root (uprobes); the probes are removed
# at the end, also when a step fails.
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
    {"cee", Regex.compile!("client\\.\\.tls13\\.\\.ExpectEncryptedExtensions" <> @state)},
    {"ccv", Regex.compile!("client\\.\\.tls13\\.\\.ExpectCertificateVerify" <> @state)},
    {"cfin", Regex.compile!("client\\.\\.tls13\\.\\.ExpectFinished" <> @state)}
  ]

  # Where macula_quic's part of phase 6 goes: probes on the bodies of its close and connect
  # NIFs (rustler runs each in a closure; connect's is the task it starts, polled in the call).
  @nif_steps [
    {"close",
     ~r/^_ZN11macula_quic10connection.*nif_func7wrapper.*10conn_close28_\$u7b\$\$u7b\$closure\$u7d\$\$u7d\$17h/},
    {"connect",
     ~r/^_ZN11macula_quic10connection.*nif_func7wrapper.*7connect28_\$u7b\$\$u7b\$closure\$u7d\$\$u7d\$17h/}
  ]

  @phases [
    "1. ClientHello built → the server takes it",
    "2. the server's key exchange, signature and flight",
    "3. the server's flight → the client takes it",
    "4. the client reads the certificate",
    "5. the client checks the signature",
    "6. the client's Finished → the next ClientHello (connection handed over, closed, next connect)"
  ]

  # Phase 6 in macula_quic, split by its NIFs' probes.
  @nif_phases [
    "6a. (macula_quic) Finished → `close_connection/1`'s NIF: the connection's answer sent, its process woken, `connect/4` returned",
    "6b. (macula_quic) → `connect/4`'s task: the close, and the next `connect/4` up to its NIF's task",
    "6c. (macula_quic) → the next ClientHello: the new connection's key share and ClientHello"
  ]

  @seconds 2.0

  def main([dir]) do
    cert = Bench.Util.make_cert(Path.join(dir, "cert"))
    quinn = Path.join(dir, "quinn_baseline")
    nif = Path.join(dir, "macula_quic/priv/native/libmacula_quic.so")

    Bench.Util.configure_runtime()

    try do
      for {tag, bin, steps} <- [{"m", nif, @steps ++ @nif_steps}, {"q", quinn, @steps}],
          {name, re} <- steps do
        Bench.Perf.add_probe(@group, "#{tag}_#{name}", bin, re)
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
    after
      Bench.Perf.remove_probes(@group)
    end
  end

  def main(_) do
    IO.puts(:stderr, "usage: bin/phases")
    System.halt(2)
  end

  # One run of each side: {handshakes/s under the probes, cycles}.
  defp macula(cert, dir, i, n) do
    out = Path.join(dir, "macula.data")
    Bench.Util.set_marker(Bench.Perf.attach(~w(record -q -e #{@group}:m_* -o #{out}), dir))
    progress("run #{i} of #{n}: macula_quic, #{@seconds} s of sequential handshakes")
    r = Bench.Macula.handshake(cert, 1, @seconds)
    {r.hs_s, cycles(out, @steps ++ @nif_steps)}
  end

  defp baseline(cert, quinn, dir, i, n) do
    progress("run #{i} of #{n}: raw Quinn, #{@seconds} s of sequential handshakes")
    out = Path.join(dir, "quinn.data")
    args = ["handshake", "cert=#{cert.certfile}", "key=#{cert.keyfile}", "seconds=#{@seconds}"]
    {json, 0} = System.cmd("perf", ~w(record -q -e #{@group}:q_* -o #{out} -- #{quinn}) ++ args)
    {Bench.Util.parse_last_json(json).hs_s, cycles(out, @steps)}
  end

  # The cycles in perf's record: for each, the times (µs) of the steps in order and of the next
  # ClientHello. A cycle counts only if each of `steps` came once, in order.
  defp cycles(file, steps) do
    {out, 0} = System.cmd("perf", ~w(script -i #{file} -F time,event), stderr_to_stdout: true)
    names = Enum.map(steps, &elem(&1, 0))

    out
    |> String.split("\n")
    |> Enum.flat_map(fn line ->
      case Regex.run(~r/([\d.]+):\s+#{@group}:[mq]_(\w+):/, line) do
        [_, t, name] -> [{String.to_float(t) * 1.0e6, name}]
        nil -> []
      end
    end)
    |> Enum.chunk_while(
      [],
      fn
        {_, "ch"} = e, acc -> {:cont, Enum.reverse(acc), [e]}
        e, acc -> {:cont, [e | acc]}
      end,
      fn acc -> {:cont, Enum.reverse(acc), []} end
    )
    |> Enum.chunk_every(2, 1, :discard)
    |> Enum.flat_map(fn [steps, [{next, "ch"} | _]] ->
      if Enum.map(steps, &elem(&1, 1)) == names,
        do: [Enum.map(steps, &elem(&1, 0)) ++ [next]],
        else: []
    end)
  end

  defp report(mine, theirs) do
    {m, q} = {Enum.flat_map(mine, &elem(&1, 1)), Enum.flat_map(theirs, &elem(&1, 1))}

    # Phase i runs from step i to the next (the last one to the next cycle's ClientHello).
    phase = fn i -> fn c -> Enum.at(c, i + 1) - Enum.at(c, i) end end
    last = fn c -> List.last(c) - Enum.at(c, 5) end

    rows =
      for i <- 0..(length(@phases) - 1) do
        f = if i == 5, do: last, else: phase.(i)
        {a, b} = {median(m, f), median(q, f)}
        "| #{Enum.at(@phases, i)} | #{fmt(a)} | #{fmt(b)} | #{signed(a - b)} |"
      end

    nif_rows =
      for {label, i} <- Enum.with_index(@nif_phases, 5),
          do: "| #{label} | #{fmt(median(m, phase.(i)))} | – | |"

    total = fn c -> List.last(c) - hd(c) end
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
        "",
        "| phase | macula_quic | raw Quinn | difference |",
        "|---|---:|---:|---:|"
      ] ++
        rows ++
        nif_rows ++
        ["| **one handshake** | **#{fmt(a)}** | **#{fmt(b)}** | **#{signed(a - b)}** |"],
      "\n"
    )
  end

  defp median([], _), do: 0

  defp median(cycles, f) do
    ds = cycles |> Enum.map(f) |> Enum.sort()
    round(Enum.at(ds, div(length(ds), 2)))
  end

  defp signed(x) when x >= 0, do: "+" <> fmt(x)
  defp signed(x), do: "−" <> fmt(-x)
end

Bench.HandshakePhases.main(System.argv())
