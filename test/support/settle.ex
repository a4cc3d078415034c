defmodule MaculaQuic.Test.Settle do
  @moduledoc false
  # For tests that end by proving nothing native is left: messages about closed handles that
  # reach the test process after it stopped reading them would keep those handles alive, so
  # they are dropped while waiting for the counters.
  import ExUnit.Assertions

  @doc "Flushes `{:quic, ...}` messages from the mailbox, then waits (bounded) for `expected` counts."
  def await_clean!(expected, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    loop(expected, deadline)
  end

  defp loop(expected, deadline) do
    flush_quic()
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    counts = MaculaQuic.native_counts()

    cond do
      Enum.all?(expected, fn {k, v} -> counts[k] <= v end) ->
        counts

      System.monotonic_time(:millisecond) > deadline ->
        flunk("native counts #{inspect(counts)} did not fall to #{inspect(expected)}")

      true ->
        # Teardown happens on runtime threads; poll (bounded) rather than guess a delay.
        receive do
        after
          20 -> loop(expected, deadline)
        end
    end
  end

  @doc "Drops every `{:quic, ...}` message (3- and 4-tuples) in the mailbox."
  def flush_quic do
    receive do
      {:quic, _, _, _} -> flush_quic()
      {:quic, _, _} -> flush_quic()
    after
      0 -> :ok
    end
  end

  @doc "All live counters at zero (client endpoints and runtime workers are shared, and stay)."
  def zero, do: %{listeners: 0, connections: 0, streams: 0, tasks: 0, bound_addresses: 0}
end
