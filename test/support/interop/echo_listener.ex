defmodule MaculaQuic.Test.EchoListener do
  @moduledoc """
  A macula_quic listener for the interop tests, run by its own process: it accepts every
  connection and stream, echoes bytes received on bidirectional streams (and the peer's FIN),
  and reports to the test process:

    * `{:echo, msg}` for every `{:quic, ...}` message it gets except stream data, unchanged;
    * `{:echo_data_before_new_stream, stream}` when a data message comes before the stream's
      `new_stream` (which must not happen);
    * `{:echo_done, stream, %{length:, sha256:, data:, flags_seen:}}` when a stream's peer
      finished sending (right after `{:echo, {:quic, :peer_send_shutdown, stream, _}}`);
      `:data` is the received bytes when they are at most 4 KiB, else `nil`;
    * `{:echo_datagram, conn, data}` for every datagram, which it sends back.

  `run/2` executes a function in the listener process (the owner of every connection and
  stream it accepted) and returns its result.
  """

  @short 4096

  @doc "Starts a listener on `{address, 0}` with `opts`; returns `{pid, listener, port}`."
  def start(address, opts) do
    test = self()
    ref = make_ref()

    pid =
      spawn_link(fn ->
        {:ok, listener} = MaculaQuic.listen({address, 0}, opts)
        {:ok, {_, port}} = MaculaQuic.sockname(listener)
        :ok = MaculaQuic.async_accept(listener)
        send(test, {ref, listener, port})
        loop(%{listener: listener, test: test, streams: %{}, conns: %{}})
      end)

    receive do
      {^ref, listener, port} -> {pid, listener, port}
    after
      5_000 -> raise "the echo listener did not start"
    end
  end

  @doc "Runs `fun` in the listener process and returns its result."
  def run(pid, fun, timeout \\ 5_000) do
    ref = make_ref()
    send(pid, {:run, self(), ref, fun})

    receive do
      {^ref, result} -> result
    after
      timeout -> raise "the echo listener did not answer"
    end
  end

  defp loop(state) do
    receive do
      {:run, from, ref, fun} ->
        send(from, {ref, fun.()})
        loop(state)

      # A datagram (its handle is a connection): echoed, and reported.
      {:quic, data, conn, 0} when is_binary(data) and is_map_key(state.conns, conn) ->
        send(state.test, {:echo_datagram, conn, data})
        :ok = MaculaQuic.send_dgram(conn, data)
        loop(state)

      {:quic, data, stream, flags} when is_binary(data) ->
        entry =
          case Map.fetch(state.streams, stream) do
            {:ok, entry} ->
              entry

            :error ->
              # Data for a stream whose new_stream has not arrived (yet).
              send(state.test, {:echo_data_before_new_stream, stream})
              %{new_entry() | known: false}
          end

        entry = %{
          entry
          | length: entry.length + byte_size(data),
            sha: :crypto.hash_update(entry.sha, data),
            short:
              if(entry.length + byte_size(data) <= @short, do: [entry.short, data], else: nil),
            flags_seen: Bitwise.bor(entry.flags_seen, flags)
        }

        entry =
          cond do
            not entry.known -> %{entry | unsent: [entry.unsent, data]}
            entry.bidi -> tap(entry, fn _ -> echo(stream, data) end)
            true -> entry
          end

        loop(put_in(state.streams[stream], entry))

      {:quic, :new_conn, conn, _info} = msg ->
        send(state.test, {:echo, msg})
        :ok = MaculaQuic.async_accept_stream(conn)
        :ok = MaculaQuic.async_accept(state.listener)
        loop(%{state | conns: Map.put(state.conns, conn, true)})

      {:quic, :new_stream, stream, %{conn: conn, flags: flags}} = msg ->
        send(state.test, {:echo, msg})
        :ok = MaculaQuic.async_accept_stream(conn)
        entry = %{Map.get(state.streams, stream, new_entry()) | bidi: Bitwise.band(flags, 1) == 0}

        # Data that came before new_stream was held back: its direction was unknown.
        if entry.bidi and entry.unsent != [], do: echo(stream, entry.unsent)

        loop(put_in(state.streams[stream], %{entry | known: true, unsent: []}))

      {:quic, :peer_send_shutdown, stream, _} = msg ->
        send(state.test, {:echo, msg})
        entry = Map.get(state.streams, stream, new_entry())

        send(
          state.test,
          {:echo_done, stream,
           %{
             length: entry.length,
             sha256: Base.encode16(:crypto.hash_final(entry.sha), case: :lower),
             data: entry.short && IO.iodata_to_binary(entry.short),
             flags_seen: entry.flags_seen
           }}
        )

        if entry.bidi, do: MaculaQuic.async_shutdown_stream(stream, 1, 0)
        loop(state)

      {:quic, _, _, _} = msg ->
        send(state.test, {:echo, msg})
        loop(state)

      {:quic, _, _} = msg ->
        send(state.test, {:echo, msg})
        loop(state)
    end
  end

  # A peer that sent STOP_SENDING wants nothing more on the stream; its data may still be on its
  # way here when the stop arrives (the stop tests send, then stop), so the echo finds the stream
  # stopped. Any other failure is a bug.
  defp echo(stream, data) do
    case MaculaQuic.async_send(stream, data) do
      :ok -> :ok
      {:error, {:peer_receive_aborted, _code}} -> :ok
    end
  end

  defp new_entry,
    do: %{
      length: 0,
      sha: :crypto.hash_init(:sha256),
      short: [],
      flags_seen: 0,
      bidi: true,
      known: true,
      unsent: []
    }
end
