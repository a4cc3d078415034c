# Trial (2026-11-29): one 1 GiB active transfer in this VM after a 64 MiB warm-up, with the
# runtime's workers and the BEAM's schedulers pinned to CPUs first (taskset), to see whether
# thread placement explains bulk's idle time. MODE: none (no pinning), w01 (the two runtime
# workers on CPUs 0 and 1), w01s0 / w01s1 (that, and both schedulers on CPU 0 / 1), w01s01
# (that, and the schedulers on CPUs 0 and 1), s1 (only the schedulers, on CPU 1). For a
# 2-CPU host; bench/README.md, "Allocation: ...", has the rounds.
#
#   elixir -pa EBIN bench/trials/pin_threads.exs MODE BYTES
Code.require_file("../lib/util.ex", __DIR__)
Code.require_file("../lib/macula.ex", __DIR__)
[mode, bytes] = System.argv()
Bench.Util.configure_runtime()
cert = Bench.Util.make_cert(Path.join(System.tmp_dir!(), "macula_quic_pin_threads"))
_ = Bench.Macula.bulk(cert, 64 * 1024 * 1024, :active)

threads =
  for t <- File.ls!("/proc/self/task"),
      do: {t, String.trim(File.read!("/proc/self/task/#{t}/comm"))}

workers = for {t, "macula_quic"} <- threads, do: t
scheds = for {t, n} <- threads, n in ["1_scheduler", "2_scheduler"], do: t
pin = fn tid, cpu -> {_, 0} = System.cmd("taskset", ["-p", "-c", cpu, tid]) end

case mode do
  "none" ->
    :ok

  "w01" ->
    Enum.zip(workers, ["0", "1"]) |> Enum.each(fn {t, c} -> pin.(t, c) end)

  "w01s1" ->
    Enum.zip(workers, ["0", "1"]) |> Enum.each(fn {t, c} -> pin.(t, c) end)
    Enum.each(scheds, &pin.(&1, "1"))

  "w01s0" ->
    Enum.zip(workers, ["0", "1"]) |> Enum.each(fn {t, c} -> pin.(t, c) end)
    Enum.each(scheds, &pin.(&1, "0"))

  "s1" ->
    Enum.each(scheds, &pin.(&1, "1"))

  "w01s01" ->
    Enum.zip(workers, ["0", "1"]) |> Enum.each(fn {t, c} -> pin.(t, c) end)
    Enum.zip(scheds, ["0", "1"]) |> Enum.each(fn {t, c} -> pin.(t, c) end)
end

r = Bench.Macula.bulk(cert, String.to_integer(bytes), :active)
IO.puts("#{mode} workers=#{length(workers)} mib_s=#{Float.round(r.mib_s, 1)}")
