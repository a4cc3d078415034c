# The CPU a VM spends while two of its processes exchange 64-byte messages over one stream at a
# paced RATE round trips/s for SECS seconds (sparse request/response, where the runtime goes idle
# between round trips; `Bench.Macula.echo_paced/4`): utime + stime of the VM from
# /proc/self/stat (10 ms ticks). The runtime settings come from the environment as in bin/bench
# (BENCH_RUNTIME_SPIN_US, ...).
#
#   elixir -pa _build/bench/lib/macula_quic/ebin bench/sparse_cpu.exs 200 10
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)
[rate, secs] = Enum.map(System.argv(), &String.to_integer/1)
Bench.Util.configure_runtime()
cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_sparse_cpu"))
r = Bench.Macula.echo_paced(cert, 64, rate, secs)

IO.puts(
  "RESULT cpu_ms=#{r.cpu_ticks * 10} wall_ms=#{div(r.wall_us, 1000)} round_trips=#{r.round_trips}"
)
