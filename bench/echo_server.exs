# The echoing end of the benchmark's "two OS processes" echo (bench/run.exs starts one per run
# and stops it by closing its standard input): listens on 127.0.0.1, prints {"port":N}, and
# echoes what arrives. See Bench.Macula.serve_echo/1.
#
#   elixir -pa EBIN bench/echo_server.exs CERTFILE KEYFILE
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/macula.ex", __DIR__)

[certfile, keyfile] = System.argv()
# The same runtime settings as the benchmark's own VM (BENCH_RUNTIME_*, inherited).
Bench.Util.configure_runtime()
Bench.Macula.serve_echo(%{certfile: certfile, keyfile: keyfile})
