# One macula_quic measurement in this VM, for bench/rounds.exs (bin/rounds), which starts a
# fresh VM for each so that no measurement inherits another's state (the runtime's threads, the
# allocators, the schedulers' load balancing). Prints `RESULT <figure>`: MiB/s, round trips/s
# or handshakes/s.
#
#   elixir -pa EBIN bench/one.exs WORKLOAD CERT_DIR
#
# WORKLOAD is one of bench/rounds.exs's; the runtime settings come from the environment
# (BENCH_RUNTIME_WORKERS, BENCH_RUNTIME_SPIN_US, BENCH_INLINE_WATCH_US) as in bin/bench.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

[workload, cert_dir] = System.argv()
Bench.Util.configure_runtime()
cert = Bench.Util.make_cert(cert_dir)
gib = 1024 * Bench.Util.mib()

figure =
  case workload do
    "echo" -> Bench.Macula.echo(cert, 64, 2.0, :async_send).rt_s
    "echo_send" -> Bench.Macula.echo(cert, 64, 2.0, :send).rt_s
    "echo4096" -> Bench.Macula.echo(cert, 4096, 2.0, :async_send).rt_s
    "bulk" -> Bench.Macula.bulk(cert, gib, :active).mib_s
    "passive" -> Bench.Macula.bulk(cert, gib, :passive).mib_s
    "hs" -> Bench.Macula.handshake(cert, 1, 2.0).hs_s
    "hs16" -> Bench.Macula.handshake(cert, 16, 2.0).hs_s
  end

IO.puts("RESULT #{figure}")
