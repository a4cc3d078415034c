# The CPU a VM spends on 64-byte request/response over one stream at a paced RATE round trips/s
# for SECS seconds (sparse traffic, where the runtime goes idle between round trips):
# utime + stime from /proc/PID/stat (10 ms ticks). By default both ends are processes of this
# VM (`Bench.Macula.echo_paced/4`); with `remote` the echoing end is another VM
# (bench/echo_server.exs, `Bench.Macula.echo_paced_remote/5`), as for a node whose peers are
# elsewhere, and both VMs' CPU is reported. The runtime settings come from the environment as in
# bin/bench (BENCH_RUNTIME_SPIN_US, ...), for both VMs.
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/sparse_cpu.exs 200 10
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/sparse_cpu.exs 200 10 remote
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

{rate, secs, where} =
  case System.argv() do
    [rate, secs] -> {String.to_integer(rate), String.to_integer(secs), :local}
    [rate, secs, "remote"] -> {String.to_integer(rate), String.to_integer(secs), :remote}
    _ -> raise ArgumentError, "usage: sparse_cpu.exs RATE SECS [remote]"
  end

Bench.Util.configure_runtime()
cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_sparse_cpu"))

case where do
  :local ->
    r = Bench.Macula.echo_paced(cert, 64, rate, secs)

    IO.puts(
      "RESULT cpu_ms=#{r.cpu_ticks * 10} wall_ms=#{div(r.wall_us, 1000)} round_trips=#{r.round_trips}"
    )

  :remote ->
    ebin = :code.lib_dir(:macula_quic, :ebin) |> to_string()
    server = Path.expand("echo_server.exs", __DIR__)
    cmd = {System.find_executable("elixir"), ["-pa", ebin, server, cert.certfile, cert.keyfile]}

    r =
      Bench.Util.with_server(cmd, fn port, os_pid ->
        Bench.Macula.echo_paced_remote(port, os_pid, 64, rate, secs)
      end)

    IO.puts(
      "RESULT cpu_ms=#{r.cpu_ticks * 10} peer_cpu_ms=#{r.peer_cpu_ticks * 10} " <>
        "wall_ms=#{div(r.wall_us, 1000)} round_trips=#{r.round_trips}"
    )
end
