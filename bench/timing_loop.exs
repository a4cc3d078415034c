# The echo benchmarks' own timing loop (`Bench.Util.time_round_trips/2`, which every Elixir-side
# implementation's echo uses) around a round trip that does nothing, against a loop that only
# counts: what the measuring itself costs per round trip (mostly the garbage collector copying
# the growing list of latencies), beside the ~25-35 µs of a 64-byte echo round trip.
#
#   elixir bench/timing_loop.exs [SECONDS]    # each loop runs SECONDS (default 3), three times
Code.require_file("lib/util.ex", __DIR__)

defmodule Bench.TimingLoop do
  def count(deadline_us, n) do
    if System.monotonic_time(:microsecond) >= deadline_us, do: n, else: count(deadline_us, n + 1)
  end
end

seconds =
  case System.argv() do
    [s] -> String.to_integer(s)
    [] -> 3
  end

nothing = fn -> :ok end

for run <- 1..3 do
  timed = Bench.Util.time_round_trips(seconds, nothing).round_trips
  t0 = System.monotonic_time(:microsecond)
  counted = Bench.TimingLoop.count(t0 + seconds * 1_000_000, 0)
  per = fn n -> Float.round(seconds * 1.0e9 / n, 1) end

  IO.puts(
    "run #{run}: time_round_trips #{per.(timed)} ns per iteration (#{timed}); " <>
      "a counting loop #{per.(counted)} ns (#{counted})"
  )
end
