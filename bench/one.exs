# One macula_quic measurement in this VM, for bench/rounds.exs (bin/rounds), which starts a
# fresh VM for each so that no measurement inherits another's state (the runtime's threads, the
# allocators, the schedulers' load balancing). Prints `RESULT <figure>`: MiB/s, round trips/s
# or handshakes/s.
#
#   elixir -pa EBIN bench/one.exs WORKLOAD CERT_DIR
#
# WORKLOAD is one of bench/lib/workloads.ex's, which also says how raw Quinn runs it; the
# runtime settings come from the environment (BENCH_RUNTIME_WORKERS, BENCH_RUNTIME_SPIN_US,
# BENCH_INLINE_WATCH_US) as in bin/bench.
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
Code.require_file("lib/workloads.ex", __DIR__)

[workload, cert_dir] = System.argv()
Bench.Util.configure_runtime()
cert = Bench.Util.make_cert(cert_dir)
IO.puts("RESULT #{Bench.Workloads.macula(workload, cert)}")
