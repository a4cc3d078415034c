defmodule MaculaQuic.Test.Quic do
  @moduledoc false
  # Helpers for tests over real loopback sockets. Every wait is bounded; nothing sleeps.
  import ExUnit.Assertions

  @alpn ["test"]
  @wait 5_000

  def alpn, do: @alpn

  @doc false
  def listen!(addr \\ "127.0.0.1", opts \\ []) do
    {:ok, l} = MaculaQuic.listen(addr, 0, Keyword.merge([alpn: @alpn], opts))
    {:ok, {_, port}} = MaculaQuic.sockname(l)
    {l, port}
  end

  @doc "A connected pair in this process: {client_conn, server_conn, listener, port}."
  def pair!(opts \\ []) do
    addr = Keyword.get(opts, :addr, "127.0.0.1")
    {l, port} = listen!(addr, Keyword.get(opts, :listen, []))
    :ok = MaculaQuic.async_accept(l)

    {:ok, c} =
      MaculaQuic.connect(
        addr,
        port,
        Keyword.merge([alpn: @alpn, verify: :none], Keyword.get(opts, :connect, [])),
        @wait
      )

    sc =
      receive do
        {:quic, :new_conn, sc, _} -> sc
      after
        @wait -> flunk("no new_conn")
      end

    {c, sc, l, port}
  end

  @doc "A client stream and the server's end of it (the client writes `first` so the server sees it)."
  def stream_pair!(c, sc, opts \\ []) do
    :ok = MaculaQuic.async_accept_stream(sc, Keyword.get(opts, :server, []))
    {:ok, s} = MaculaQuic.open_stream(c, Keyword.get(opts, :client, []))
    first = Keyword.get(opts, :first, "hello")
    :ok = MaculaQuic.send(s, first)

    # Only this connection's stream, accepted here: an orphan of another connection (one
    # that a test's exited process had been accepting on) may be in the mailbox first.
    receive do
      {:quic, :new_stream, ss, %{conn: ^sc, is_orphan: false}} -> {s, ss}
    after
      @wait -> flunk("no new_stream")
    end
  end

  defmacro receive_msg!(pattern, timeout \\ @wait) do
    quote do
      receive do
        unquote(pattern) = msg -> msg
      after
        unquote(timeout) ->
          flunk(
            "no message matching #{unquote(Macro.to_string(pattern))} within #{unquote(timeout)} ms; mailbox: #{inspect(Process.info(self(), :messages))}"
          )
      end
    end
  end

  @doc """
  Reads an active `stream` to its end, hashing the bytes (SHA-256): `{:ok, digest, bytes}`, or
  `{:error, event, detail, bytes}` when it was aborted or closed first, or
  `{:error, :stalled, bytes}` when nothing came for `stall_ms`.
  """
  def sha256_to_fin(stream, stall_ms),
    do: sha256_to_fin(stream, stall_ms, :crypto.hash_init(:sha256), 0)

  defp sha256_to_fin(stream, stall_ms, hash, n) do
    receive do
      {:quic, data, ^stream, flags} when is_binary(data) ->
        hash = :crypto.hash_update(hash, data)
        n = n + byte_size(data)

        # The FIN may come with the last data (flag 2) or on its own.
        if Bitwise.band(flags, 2) != 0,
          do: {:ok, :crypto.hash_final(hash), n},
          else: sha256_to_fin(stream, stall_ms, hash, n)

      {:quic, :peer_send_shutdown, ^stream, _} ->
        {:ok, :crypto.hash_final(hash), n}

      {:quic, event, ^stream, detail} when event in [:peer_send_aborted, :stream_closed] ->
        {:error, event, detail, n}
    after
      stall_ms -> {:error, :stalled, n}
    end
  end

  @doc """
  Asserts that server connection `sc` is the other end of client connection `c`: data sent on
  a new stream of `c` arrives on `sc`. (Clients share one local address, so comparing
  addresses cannot tell connections apart.)
  """
  def same_connection!(c, sc) do
    token = "conn #{System.unique_integer([:positive])}"
    {s, ss} = stream_pair!(c, sc, first: token)
    assert collect!(ss, byte_size(token)) == token
    :ok = MaculaQuic.close_stream(s)
    :ok = MaculaQuic.close_stream(ss)
  end

  @doc "Collects `{:quic, data, stream, _}` messages for `stream` until `n` bytes arrived."
  def collect!(stream, n, acc \\ [], got \\ 0)
  def collect!(_stream, n, acc, got) when got >= n, do: IO.iodata_to_binary(Enum.reverse(acc))

  def collect!(stream, n, acc, got) do
    receive do
      {:quic, data, ^stream, _flags} when is_binary(data) ->
        collect!(stream, n, [data | acc], got + byte_size(data))
    after
      @wait -> flunk("only #{got} of #{n} bytes arrived")
    end
  end

  @doc "Polls until a passive `stream` has exactly `n` bytes buffered (no message says so)."
  def await_buffered!(stream, n, tries \\ 500) do
    case MaculaQuic.Native.stream_info(stream) do
      %{buffered: ^n} -> :ok
      _ when tries > 0 -> receive(after: (10 -> await_buffered!(stream, n, tries - 1)))
      info -> flunk("#{n} bytes never buffered: #{inspect(info)}")
    end
  end

  @doc """
  Polls until `pid` waits in a `receive` (a call of ours waiting for its answer): no message
  says so.
  """
  def wait_until_waiting!(pid, tries \\ 500) do
    case Process.info(pid, :status) do
      {:status, :waiting} -> :ok
      _ when tries > 0 -> receive(after: (10 -> wait_until_waiting!(pid, tries - 1)))
      other -> flunk("#{inspect(pid)} never blocked: #{inspect(other)}")
    end
  end

  @doc """
  Polls `fun` every 10 ms until it returns true (then true), at most `tries` times (then
  false): for states no message announces, such as a process waiting in a `receive`.
  """
  def wait_until(fun, tries \\ 250) do
    look = fn -> if fun.(), do: {:ok, true}, else: {:wait, false} end
    match?({:ok, _}, poll_until(look, 10, tries * 10))
  end

  @doc """
  Waits until the native side reports `counts` (a map subset), or fails after `timeout`.
  `before_poll` runs before every check (`MaculaQuic.Test.Settle` flushes stray messages there).
  """
  def await_counts!(expected, timeout \\ 5_000, before_poll \\ fn -> :ok end) do
    poll_counts!(
      fn counts -> Enum.all?(expected, fn {k, v} -> counts[k] <= v end) end,
      &"native counts #{inspect(&1)} did not fall to #{inspect(expected)}",
      timeout,
      fn ->
        before_poll.()
        # A handle stays alive while any process still holds a reference, garbage included:
        # collect every process so only live references count.
        for pid <- Process.list(), do: :erlang.garbage_collect(pid)
      end
    )
  end

  @doc """
  Waits until the only shards left are the client endpoints' (which keep theirs): every
  listener's and connection's shard has been freed (and no stream is left). For `on_exit`
  (once the test's handles are gone) or the start of a test.
  """
  def shards_freed! do
    endpoints = MaculaQuic.native_counts().client_endpoints
    await_counts!(%{listeners: 0, connections: 0, streams: 0, shards: endpoints}, 30_000)
  end

  @doc """
  Polls `MaculaQuic.native_counts/0` until `ready?.(counts)` holds and returns those counts, or
  fails with `failure.(counts)` after `timeout`. `before_poll` runs before every look.
  """
  def poll_counts!(ready?, failure, timeout \\ 5_000, before_poll \\ fn -> :ok end) do
    look = fn ->
      before_poll.()
      counts = MaculaQuic.native_counts()
      if ready?.(counts), do: {:ok, counts}, else: {:wait, counts}
    end

    # Native state changes on runtime threads, with no message to wait for.
    case poll_until(look, 20, timeout) do
      {:ok, counts} -> counts
      {:timeout, counts} -> flunk(failure.(counts))
    end
  end

  @doc """
  Reads `read.()` every `every` ms until it gives the same value twice in a row and
  `settled?` holds for it (a figure that stopped moving: a sender stalled on flow control, with
  no message to say so), and returns that value; fails with `failure.(last)` after `tries` more
  reads.
  """
  def await_settled!(read, every, tries, failure, settled? \\ fn _ -> true end),
    do: await_settled!(read, every, tries, failure, settled?, :none)

  defp await_settled!(read, every, tries, failure, settled?, last) do
    now = read.()

    cond do
      now == last and settled?.(now) ->
        now

      tries == 0 ->
        flunk(failure.(now))

      true ->
        receive(after: (every -> await_settled!(read, every, tries - 1, failure, settled?, now)))
    end
  end

  # Calls `look` (`{:ok, value}` when done, else `{:wait, last}`) every `every` ms until it is
  # done or `deadline` (monotonic ms) has passed: `{:ok, value}` or `{:timeout, last}`. Bounded
  # polling for what no message announces, rather than a guessed delay.
  @doc """
  Calls `look.()` every `every` ms until it returns `{:ok, value}` (then `{:ok, value}`), for at
  most `timeout` ms (then `{:timeout, last}`, where `{:wait, last}` was its last answer).
  """
  def poll_until(look, every, timeout),
    do: poll(look, every, System.monotonic_time(:millisecond) + timeout)

  defp poll(look, every, deadline) do
    case look.() do
      {:ok, value} ->
        {:ok, value}

      {:wait, last} ->
        if System.monotonic_time(:millisecond) > deadline,
          do: {:timeout, last},
          else: receive(after: (every -> poll(look, every, deadline)))
    end
  end

  @doc """
  A UDP relay on 127.0.0.1 in front of the listener on `port`, linked to the caller: forwards
  both ways; `relay.back.(false)` drops what the listener sends (acknowledgements included)
  until `relay.back.(true)`; `relay.stop.()` closes it. Connect to `relay.port`.
  """
  def relay!(port) do
    parent = self()

    pid =
      spawn_link(fn ->
        {:ok, sock} = :gen_udp.open(0, [:binary, ip: {127, 0, 0, 1}, active: true])
        {:ok, rport} = :inet.port(sock)
        send(parent, {:relay, self(), rport})
        relay_loop(sock, port, nil, true)
      end)

    assert_receive {:relay, ^pid, rport}, @wait

    ask = fn msg ->
      ref = make_ref()
      send(pid, {msg, self(), ref})
      assert_receive {^ref, :ok}, @wait
    end

    %{port: rport, back: &ask.({:back, &1}), stop: fn -> ask.(:stop) end}
  end

  defp relay_loop(sock, port, client, back) do
    receive do
      {:udp, ^sock, {127, 0, 0, 1}, ^port, data} ->
        if back and client, do: :gen_udp.send(sock, client, data)
        relay_loop(sock, port, client, back)

      {:udp, ^sock, ip, from, data} ->
        :gen_udp.send(sock, {127, 0, 0, 1}, port, data)
        relay_loop(sock, port, {ip, from}, back)

      {{:back, on}, from, ref} ->
        send(from, {ref, :ok})
        relay_loop(sock, port, client, on)

      {:stop, from, ref} ->
        :gen_udp.close(sock)
        send(from, {ref, :ok})
    end
  end
end
