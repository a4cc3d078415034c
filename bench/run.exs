# The benchmark suite: macula_quic side by side with raw Quinn (native/macula_quic/examples/
# quinn_baseline.rs), OTP :ssl (TLS 1.3 over TCP) and :gen_tcp, on loopback, in one run; beside
# the 64-byte echo also plain UDP between two BEAM processes (lib/udp.ex), the floor for any
# engine that hands its data to processes.
# Run it with bin/bench (which builds what it needs); README.md's Benchmarks section has the
# latest table.
#
#   BENCH_SCALE   sizes/counts multiplier (default 1.0: 1 GiB bulk, 100 x 10 MiB fan-out,
#                 10,000 idle connections, 2 s timed runs); e.g. 0.05 for a quick run
#   BENCH_REPEAT  runs per measurement, the median is reported (default 5; 1 when scale < 1)
#   BENCH_ONLY    comma-separated subset of bulk,echo,fanout,handshake,memory (echo includes
#                 the two-OS-processes and the datagram rows)
#   BENCH_QUINN   path of the quinn_baseline binary (set by bin/bench)
#   BENCH_OUT     output directory (default bench/results)
#   BENCH_RUNTIME_WORKERS  macula_quic's runtime worker threads (default: sized for the host)
#   BENCH_RUNTIME_SPIN_US  how long its workers watch the sockets before sleeping (default 20)
#   BENCH_RUNTIME_SPIN_MAX_US  the longest that watch grows to while it catches work (default 500)
#   BENCH_INLINE_WATCH_US  how long a call that sent watches the sockets for the answer (default 0)
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Code.require_file("lib/tcp.ex", __DIR__)
Code.require_file("lib/udp.ex", __DIR__)

defmodule Bench.Run do
  import Bench.Util

  @workloads ~w(bulk echo fanout handshake memory)

  def main do
    configure_runtime()

    progress("starting (scale #{scale()}, repeat #{repeat()})")
    {:ok, _} = Application.ensure_all_started(:ssl)
    out = System.get_env("BENCH_OUT") || Path.expand("results", __DIR__)
    File.mkdir_p!(out)
    cert_dir = Path.join(System.tmp_dir!(), "macula_quic_bench_#{System.os_time()}")
    cert = make_cert(cert_dir)
    quinn = Bench.Util.quinn_path()
    only = (System.get_env("BENCH_ONLY") || Enum.join(@workloads, ",")) |> String.split(",")
    machine = machine()

    progress(
      "machine: #{machine.nproc} cpus, #{machine.cpu_model}; OTP #{machine.otp}, Elixir #{machine.elixir}, #{machine.rustc}"
    )

    t0 = System.monotonic_time(:millisecond)
    ctx = %{cert: cert, quinn: quinn}
    crypto = crypto(ctx)
    progress("cryptography: #{crypto}")

    rows =
      try do
        Enum.flat_map(@workloads, fn w ->
          if w in only, do: apply(__MODULE__, String.to_atom(w), [ctx]), else: []
        end)
      after
        # The throwaway certificate; runs used to leave one directory each behind.
        File.rm_rf(cert_dir)
      end

    elapsed = (System.monotonic_time(:millisecond) - t0) / 1000

    report = %{
      machine: machine,
      scale: scale(),
      repeat: repeat(),
      settings: Bench.Util.settings(),
      cert: "ECDSA P-256 self-signed (#{cert.via}), TLS 1.3 only, client verify none",
      crypto: crypto,
      elapsed_seconds: elapsed,
      date: DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601(),
      results: rows
    }

    File.write!(Path.join(out, "latest.json"), json(report) <> "\n")
    md = markdown(report)
    File.write!(Path.join(out, "latest.md"), md)
    progress("done in #{fmt(elapsed)} s; wrote #{Path.join(out, "latest.json")} and latest.md")
    IO.puts("\n" <> md)
  end

  # The cipher suite and key exchange group each side's handshakes use, for the report: raw
  # Quinn's from its rustls configurations (which have the NIF's settings; Quinn does not expose
  # a connection's TLS session, so macula_quic's cannot be asked), `:ssl`'s from a connection. A
  # probe that fails says so in the report instead of stopping the run.
  defp crypto(ctx) do
    quic =
      probe(fn ->
        r = Bench.Util.run_quinn(ctx.quinn, "suite", ctx.cert, [])
        "#{r.cipher_suite}, #{r.group}"
      end)

    ssl = probe(fn -> Bench.Tcp.ssl_suite(ctx.cert) end)
    "QUIC (raw Quinn's TLS configuration, the NIF's settings): #{quic}; :ssl: #{ssl}"
  end

  defp probe(f) do
    f.()
  rescue
    e -> "unknown (#{Exception.message(e)})"
  end

  ## Running and summarising

  # Runs each implementation's function `repeat()` times, interleaved, each repeat starting one
  # implementation further along (a, b, c, b, c, a, c, a, b, ...: the host drifts within a
  # repeat too, and a fixed order would lean the same way every time), and keeps the run with
  # the median `key` for each.
  defp measure(label, key, impls) do
    runs =
      for i <- 1..repeat(), {name, fun} <- Bench.Util.rotate(impls, i - 1), reduce: %{} do
        acc ->
          r = fun.()
          progress("#{label} #{name} [#{i}/#{repeat()}]: #{key}=#{fmt(r[key] * 1.0)}#{extra(r)}")
          Map.update(acc, name, [r], &[r | &1])
      end

    Map.new(runs, fn {name, rs} ->
      sorted = Enum.sort_by(rs, & &1[key])
      med = Enum.at(sorted, div(length(sorted) - 1, 2))
      {name, Map.put(med, :all_runs, Enum.map(rs, & &1[key]) |> Enum.reverse())}
    end)
  end

  defp extra(%{ios_per_datagram: x}), do: " ios/dgram=#{fmt(x * 1.0)}"
  defp extra(%{p50_us: p50, p99_us: p99}), do: " p50=#{fmt(p50 * 1.0)}us p99=#{fmt(p99 * 1.0)}us"
  defp extra(_), do: ""

  defp quinn(ctx, workload, params),
    do: Bench.Util.run_quinn(ctx.quinn, workload, ctx.cert, params)

  # The ratio within each repeat (runs are interleaved, so the i-th runs of two implementations
  # ran next to each other), as [lowest, highest]: how much of a ratio is noise.
  defp run_ratios(%{all_runs: ms}, %{all_runs: qs}, _key) when length(ms) == length(qs) do
    rs = Enum.zip_with(ms, qs, fn m, q -> m / q end)
    [Enum.min(rs), Enum.max(rs)]
  end

  defp run_ratios(_, _, _), do: nil

  defp row(workload, variant, unit, key, res, target) do
    get = fn name -> res[name] && res[name][key] end
    m = get.("macula")
    ratio = fn other -> if m && get.(other), do: m / get.(other), else: nil end

    %{
      workload: workload,
      variant: variant,
      unit: unit,
      metric: key,
      macula: m,
      quinn: get.("quinn"),
      ssl: get.("ssl"),
      gen_tcp: get.("gen_tcp"),
      macula_vs_quinn: ratio.("quinn"),
      macula_vs_quinn_runs: run_ratios(res["macula"], res["quinn"], key),
      macula_vs_ssl: ratio.("ssl"),
      target: target,
      details: res
    }
  end

  ## Workloads

  def bulk(ctx) do
    total = scaled_bytes(1024 * mib(), mib())
    progress("bulk: #{div(total, mib())} MiB over one stream")
    macula = fn mode -> fn -> Bench.Macula.bulk(ctx.cert, total, mode) end end

    # One interleaved set for both receive modes: raw Quinn's reader is the same for both, so
    # every macula_quic variant is compared with the Quinn run of its own round.
    impls = [
      {"macula active", macula.(:active)},
      {"macula passive", macula.(:passive)},
      {"quinn", fn -> quinn(ctx, "bulk", bytes: total) end},
      {"ssl active", fn -> Bench.Tcp.bulk(:ssl, ctx.cert, total, :active) end},
      {"ssl passive", fn -> Bench.Tcp.bulk(:ssl, ctx.cert, total, :passive) end},
      {"gen_tcp active", fn -> Bench.Tcp.bulk(:gen_tcp, ctx.cert, total, :active) end},
      {"gen_tcp passive", fn -> Bench.Tcp.bulk(:gen_tcp, ctx.cert, total, :passive) end}
    ]

    res = measure("bulk", :mib_s, impls)

    for mode <- ~w(active passive) do
      picked = %{
        "macula" => res["macula #{mode}"],
        "quinn" => res["quinn"],
        "ssl" => res["ssl #{mode}"],
        "gen_tcp" => res["gen_tcp #{mode}"]
      }

      "bulk"
      |> row(
        "#{div(total, mib())} MiB, #{mode}",
        "MiB/s",
        :mib_s,
        picked,
        "≥0.9× quinn, ≥1.0× ssl"
      )
      |> Map.merge(%{
        macula_ios_per_datagram: picked["macula"][:ios_per_datagram],
        quinn_ios_per_datagram: res["quinn"] && res["quinn"][:ios_per_datagram],
        macula_faults_per_mib: picked["macula"][:faults_per_mib],
        quinn_faults_per_mib: res["quinn"] && res["quinn"][:faults_per_mib]
      })
    end
  end

  def echo(ctx) do
    secs = seconds(2.0)

    for size <- [64, 4096] do
      progress("echo: #{size}-byte round trips on one stream, #{fmt(secs)} s per run")

      impls =
        [
          {"macula", fn -> Bench.Macula.echo(ctx.cert, size, secs, :async_send) end},
          {"macula_send", fn -> Bench.Macula.echo(ctx.cert, size, secs, :send) end},
          {"quinn", fn -> quinn(ctx, "echo", size: size, seconds: secs) end},
          {"ssl", fn -> Bench.Tcp.echo(:ssl, ctx.cert, size, secs) end},
          {"gen_tcp", fn -> Bench.Tcp.echo(:gen_tcp, ctx.cert, size, secs) end}
        ] ++
          if size == 64 do
            # The floor: plain UDP between two BEAM processes, no QUIC (see lib/udp.ex).
            [
              {"udp_gen_udp", fn -> Bench.Udp.echo(:gen_udp, size, secs) end},
              {"udp_socket", fn -> Bench.Udp.echo(:socket, size, secs) end}
            ]
          else
            []
          end

      res = measure("echo #{size}B", :rt_s, impls)
      target = if size == 64, do: "≥0.8× quinn", else: nil

      r =
        "echo"
        |> row("#{size} B", "round trips/s", :rt_s, res, target)
        |> Map.put(
          :macula_shard_runs,
          res["macula"] && Map.take(res["macula"], [:inline_runs_per_rt, :runtime_runs_per_rt])
        )
        |> Map.put(:udp_floor, udp_floor(res))

      lat = fn name -> res[name] && {res[name][:p50_us], res[name][:p99_us]} end

      [
        r,
        Map.merge(
          row(
            "echo",
            "#{size} B, send/2",
            "round trips/s",
            :rt_s,
            %{res | "macula" => res["macula_send"]},
            nil
          ),
          %{details: %{}}
        )
      ]
      |> Enum.map(
        &Map.put(
          &1,
          :latency_us,
          Map.new(["macula", "macula_send", "quinn", "ssl", "gen_tcp"], fn n ->
            {n, lat.(n) && Tuple.to_list(lat.(n))}
          end)
        )
      )
    end
    |> List.flatten()
    |> Kernel.++([echo_two_processes(ctx, secs), dgram_echo(ctx, secs)])
  end

  # 64-byte QUIC datagram round trips on one connection (`send_dgram/2`; raw Quinn's
  # `send_datagram`/`read_datagram`), one in flight: no target, there to show what the datagram
  # path costs. A datagram not back within a second counts as lost.
  defp dgram_echo(ctx, secs) do
    size = 64
    progress("echo: #{size}-byte datagram round trips on one connection, #{fmt(secs)} s per run")

    res =
      measure("echo #{size}B datagrams", :rt_s, [
        {"macula", fn -> Bench.Macula.dgram_echo(ctx.cert, size, secs) end},
        {"quinn", fn -> quinn(ctx, "dgram_echo", size: size, seconds: secs) end}
      ])

    "echo"
    |> row("#{size} B datagrams", "round trips/s", :rt_s, res, nil)
    |> Map.put(
      :latency_us,
      Map.new(["macula", "quinn"], fn n -> {n, res[n] && [res[n][:p50_us], res[n][:p99_us]]} end)
    )
    |> Map.put(:lost, Map.new(["macula", "quinn"], fn n -> {n, res[n] && res[n][:lost]} end))
  end

  # The plain-UDP echo rates (median) and, within each interleaved run, what macula_quic and
  # raw Quinn did against `:socket`'s, the floor for an engine woken through the BEAM's polling.
  defp udp_floor(%{"udp_socket" => socket, "udp_gen_udp" => gen_udp} = res) do
    %{
      gen_udp: gen_udp.rt_s,
      socket: socket.rt_s,
      macula_vs_socket_runs: res["macula"] && run_ratios(res["macula"], socket, :rt_s),
      quinn_vs_socket_runs: res["quinn"] && run_ratios(res["quinn"], socket, :rt_s)
    }
  end

  defp udp_floor(_res), do: nil

  # 64-byte echo with the echoing end in another OS process, started for each run (macula_quic:
  # bench/echo_server.exs in a second VM; raw Quinn: quinn_baseline's role=server). With both
  # ends in one process, a thread that has just sent finds the peer's datagram already waiting
  # when it next polls; with two processes, each arriving datagram has to wake its process.
  defp echo_two_processes(ctx, secs) do
    size = 64
    progress("echo: #{size}-byte round trips, echoing end in another OS process")
    macula_server = Bench.Util.macula_echo_server(ctx.cert)
    quinn_server = Bench.Util.quinn_echo_server(ctx.quinn, ctx.cert)

    res =
      measure("echo #{size}B, two OS processes", :rt_s, [
        {"macula",
         fn ->
           Bench.Util.with_server(macula_server, fn port, _os_pid ->
             Bench.Macula.echo_remote(port, size, secs)
           end)
         end},
        {"quinn",
         fn ->
           Bench.Util.with_server(quinn_server, fn port, _os_pid ->
             quinn(ctx, "echo", size: size, seconds: secs, peer_port: port)
           end)
         end}
      ])

    "echo"
    |> row("#{size} B, two OS processes", "round trips/s", :rt_s, res, nil)
    |> Map.put(
      :latency_us,
      Map.new(["macula", "quinn"], fn n -> {n, res[n] && [res[n][:p50_us], res[n][:p99_us]]} end)
    )
  end

  def fanout(ctx) do
    streams = 100
    per = scaled_bytes(10 * mib(), 65_536)
    progress("fan-out: #{streams} streams x #{fmt(per / mib())} MiB on one connection")

    res =
      measure("fanout", :mib_s, [
        {"macula", fn -> Bench.Macula.fanout(ctx.cert, streams, per) end},
        {"quinn", fn -> quinn(ctx, "fanout", streams: streams, bytes: per) end}
      ])

    [row("fanout", "#{streams} × #{fmt(per / mib())} MiB", "MiB/s", :mib_s, res, nil)]
  end

  def handshake(ctx) do
    secs = seconds(2.0)

    for conc <- [1, 16] do
      progress("handshakes: connect+close, #{conc} at a time, #{fmt(secs)} s per run")

      res =
        measure("handshake x#{conc}", :hs_s, [
          {"macula", fn -> Bench.Macula.handshake(ctx.cert, conc, secs) end},
          {"quinn", fn -> quinn(ctx, "handshake", concurrency: conc, seconds: secs) end},
          {"ssl", fn -> Bench.Tcp.handshake(:ssl, ctx.cert, conc, secs) end},
          {"gen_tcp", fn -> Bench.Tcp.handshake(:gen_tcp, ctx.cert, conc, secs) end}
        ])

      "handshake"
      |> row(
        if(conc == 1, do: "sequential", else: "#{conc} concurrent"),
        "handshakes/s",
        :hs_s,
        res,
        "≥0.9× quinn"
      )
      |> Map.put(:macula_resumptions_per_hs, res["macula"] && res["macula"][:resumptions_per_hs])
    end
  end

  def memory(ctx) do
    n = scaled_count(10_000, 100)
    progress("idle memory: #{n} connections (both ends in one OS process), fresh process each")
    script = Path.expand("memory.exs", __DIR__)

    macula = fn ->
      {exe, args} = Bench.Util.elixir_vm(script, [ctx.cert.certfile, ctx.cert.keyfile, "#{n}"])

      {out, 0} = System.cmd(exe, args, stderr_to_stdout: true)

      parse_last_json(out)
    end

    res =
      measure("memory", :bytes_per_conn, [
        {"macula", macula},
        {"quinn", fn -> quinn(ctx, "memory", conns: n, idle_timeout_ms: 120_000) end}
      ])

    [row("memory", "#{n} idle connections", "bytes/conn (both ends)", :bytes_per_conn, res, nil)]
  end

  ## Report

  def markdown(r) do
    m = r.machine

    head = """
    ## macula_quic benchmarks (#{r.date})

    Machine: #{m.nproc} CPUs (#{m.cpu_model}), #{m.mem_total_gib} GiB, Linux #{m.kernel}, cpuidle #{m.cpuidle}; OTP #{m.otp} (erts #{m.erts}), Elixir #{m.elixir}, #{m.rustc}, Quinn #{m.quinn}.
    Loopback, both ends in one OS process per implementation (except the "two OS processes" row); BENCH_SCALE=#{r.scale}, median of #{r.repeat}; settings: #{r.settings}; #{r.cert}; #{r.crypto}. Suite time #{fmt(r.elapsed_seconds)} s.

    | workload | unit | macula_quic | raw Quinn | :ssl | :gen_tcp | macula/Quinn | each run | macula/ssl | target |
    |---|---|---:|---:|---:|---:|---:|---:|---:|---|
    """

    lines =
      Enum.map(r.results, fn x ->
        "| #{x.workload}: #{x.variant} | #{x.unit} | #{fmt(x.macula)} | #{fmt(x.quinn)} | #{fmt(x.ssl)} | #{fmt(x.gen_tcp)} | #{ratio(x.macula_vs_quinn)} | #{ratio_range(x[:macula_vs_quinn_runs])} | #{ratio(x.macula_vs_ssl)} | #{x.target || ""} |"
      end)

    ios =
      r.results
      |> Enum.filter(&(&1.workload == "bulk"))
      |> Enum.map(fn x ->
        "- bulk #{x.variant}: udp_tx ios/datagrams macula #{fmt(x.macula_ios_per_datagram)}, Quinn #{fmt(x.quinn_ios_per_datagram)} (below 1: GSO batches several datagrams per sendmsg); minor page faults per MiB macula #{fmt(x.macula_faults_per_mib)}, Quinn #{fmt(x.quinn_faults_per_mib)} (the whole OS process, both ends)"
      end)

    lat =
      r.results
      |> Enum.filter(&Map.has_key?(&1, :latency_us))
      |> Enum.uniq_by(&String.replace_suffix(&1.variant, ", send/2", ""))
      |> Enum.map(fn x ->
        parts =
          for {n, v} <- Enum.sort(x.latency_us),
              v != nil,
              do: "#{n} #{fmt(Enum.at(v, 0) * 1.0)}/#{fmt(Enum.at(v, 1) * 1.0)}"

        "- echo #{String.replace_suffix(x.variant, ", send/2", "")} latency p50/p99 µs: " <>
          Enum.join(parts, ", ")
      end)

    # Rows without the field (other workloads, or a side that did not run) fail the pattern and
    # are skipped.
    inline =
      for %{macula_shard_runs: %{inline_runs_per_rt: _} = runs} = x <- r.results do
        "- echo #{x.variant}: per round trip, macula ran connection work #{fmt(runs.inline_runs_per_rt * 1.0)} times inside the calling process's own call (`inline_runs`) and #{fmt(runs.runtime_runs_per_rt * 1.0)} times on a runtime worker"
      end

    floor =
      for %{udp_floor: %{} = f} = x <- r.results do
        "- echo #{x.variant}, the floor without QUIC: two BEAM processes echoing plain UDP datagrams did #{fmt(f.gen_udp)} round trips/s through `:gen_udp` and #{fmt(f.socket)} through `:socket` (woken via `enif_select`); within each run macula did #{ratio_range(f.macula_vs_socket_runs)} and raw Quinn #{ratio_range(f.quinn_vs_socket_runs)} of `:socket`'s rate"
      end

    lost =
      for %{lost: %{"macula" => m, "quinn" => q}} = x <- r.results do
        "- echo #{x.variant}: lost (not back within a second) macula #{m || "–"}, Quinn #{q || "–"}"
      end

    resumed =
      for %{macula_resumptions_per_hs: n} = x <- r.results, is_number(n) do
        "- handshake #{x.variant}: full TLS handshakes everywhere (macula connects with `session_resumption: false` and resumed #{fmt(n * 1.0)} per handshake; raw Quinn's client keeps no tickets; `:ssl`'s client asks for none)"
      end

    # A guest whose idle vCPUs halt at once makes every hand-off between threads a possible
    # trip through the host: say so next to the figures it moves.
    halting =
      if m.halt_poll_ns == 0 do
        [
          "- this VM's idle vCPUs halt without polling first (`guest_halt_poll_ns=0`): request/response figures that hand data between threads (macula_quic's echo, `:socket`) come in two speeds from run to run here; see README, \"Tuning: a KVM guest's idle polling\""
        ]
      else
        []
      end

    head <>
      Enum.join(lines, "\n") <>
      "\n\n" <>
      Enum.join(ios ++ lat ++ lost ++ inline ++ floor ++ resumed ++ halting, "\n") <>
      "\n\n\"each run\": macula/Quinn within each of the #{r.repeat} interleaved runs, lowest–highest. " <>
      "macula echo uses `async_send/2` on both ends; the \"send/2\" row uses the blocking `send/2`. " <>
      "Memory is resident memory (VM + native, VmRSS) per connection with both ends in the process.\n"
  end

  defp ratio(nil), do: "–"
  defp ratio(x), do: :erlang.float_to_binary(x * 1.0, decimals: 2) <> "×"

  defp ratio_range([lo, hi]) when lo == hi, do: ratio(lo)

  defp ratio_range([lo, hi]),
    do: :erlang.float_to_binary(lo * 1.0, decimals: 2) <> "–" <> ratio(hi)

  defp ratio_range(_), do: "–"
end

Bench.Run.main()
