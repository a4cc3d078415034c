defmodule MaculaQuic.Test.Settle do
  @moduledoc false
  # For tests that end by proving nothing native is left: messages about closed handles that
  # reach the test process after it stopped reading them would keep those handles alive, so
  # they are dropped while waiting for the counters.
  @doc "Flushes `{:quic, ...}` messages from the mailbox, then waits (bounded) for `expected` counts."
  def await_clean!(expected, timeout \\ 10_000),
    do: MaculaQuic.Test.Quic.await_counts!(expected, timeout, &flush_quic/0)

  @doc "Drops every `{:quic, ...}` message (3- and 4-tuples) and `handoff_done` in the mailbox, closing orphan streams."
  def flush_quic do
    receive do
      # An orphan stream (its acceptor exited) is this process's: close it, or it stays open.
      {:quic, :new_stream, s, %{is_orphan: true}} ->
        MaculaQuic.close_stream(s)
        flush_quic()

      {:quic, _, _, _} ->
        flush_quic()

      {:quic, _, _} ->
        flush_quic()

      # handoff_stream/3's word to the new owner holds the stream too.
      {:handoff_done, _, _} ->
        flush_quic()
    after
      0 -> :ok
    end
  end

  @doc "All live counters at zero (client endpoints and runtime workers are shared, and stay)."
  def zero,
    do: %{
      listeners: 0,
      connections: 0,
      streams: 0,
      tasks: 0,
      bound_addresses: 0,
      received_buffers: 0
    }
end
