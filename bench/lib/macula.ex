defmodule Bench.Macula do
  @moduledoc false
  # The workloads through macula_quic: both ends in this VM, each side in its own processes.
  import Bench.Util, only: [now_us: 0, mib: 0]

  @alpn ["bench"]

  # The handshake workload measures full TLS handshakes in every implementation: a reconnect
  # that resumes a session skips the certificate's signing and verifying, and whether one can
  # depends on how long the last connection lived (see quinn_baseline.rs).
  @full_handshake [session_resumption: false]

  def listen(cert, extra \\ []) do
    {:ok, l} =
      MaculaQuic.listen(
        {"127.0.0.1", 0},
        [alpn: @alpn, certfile: cert.certfile, keyfile: cert.keyfile] ++ extra
      )

    {:ok, {_, port}} = MaculaQuic.sockname(l)
    {l, port}
  end

  def connect(port, extra \\ []) do
    {:ok, c} = MaculaQuic.connect("127.0.0.1", port, [alpn: @alpn, verify: :none] ++ extra, 5_000)
    c
  end

  @doc """
  A listener (with `listen_opts` on top of `listen/2`'s) and one connection to it:
  `{listener, client connection, server connection}`; the caller owns both ends.
  """
  def pair(cert, listen_opts \\ []) do
    {l, port} = listen(cert, listen_opts)
    :ok = MaculaQuic.async_accept(l)
    c = connect(port)
    sc = receive(do: ({:quic, :new_conn, sc, _} -> sc))
    {l, c, sc}
  end

  @doc "Closes what `pair/2` opened and drops what is left in the caller's mailbox."
  def teardown(l, c, sc) do
    MaculaQuic.close_connection(c)
    MaculaQuic.close_connection(sc)
    MaculaQuic.close_listener(l)
    Bench.Util.flush()
  end

  # Sends `total` bytes in pieces of `piece` (a binary made before the clock starts, as the other
  # implementations' harnesses do: :binary.copy/2 of a 1 MiB piece takes ~8 ms) on a fresh
  # stream, then FIN. Stays alive (the stream's owner) until told to stop, so the stream is not
  # reset by its owner exiting.
  defp sender(c, total, piece, parent) do
    spawn_link(fn ->
      {:ok, s} = MaculaQuic.open_stream(c)
      chunk = byte_size(piece)
      full = div(total, chunk)
      Enum.each(1..full//1, fn _ -> :ok = MaculaQuic.send(s, piece) end)
      rest = total - full * chunk
      if rest > 0, do: :ok = MaculaQuic.send(s, binary_part(piece, 0, rest))
      :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_graceful(), 0)
      send(parent, {:sent, self()})
      receive(do: (:stop -> :ok))
    end)
  end

  # Accepts one stream in `mode` (with `opts` on top) and counts its bytes to the end; tells
  # `parent` when done.
  defp receiver(sc, mode, opts, parent) do
    spawn_link(fn ->
      active = if mode == :active, do: true, else: false
      :ok = MaculaQuic.async_accept_stream(sc, [active: active] ++ opts)
      ss = receive(do: ({:quic, :new_stream, ss, _} -> ss))

      {n, msgs} =
        case mode do
          :active -> count_active(ss, 0, 0)
          :passive -> count_passive(ss, 0, 0)
        end

      send(parent, {:received, self(), n, msgs, now_us()})
      receive(do: (:stop -> :ok))
    end)
  end

  defp count_active(ss, n, m) do
    receive do
      {:quic, d, ^ss, flags} when is_binary(d) ->
        if Bitwise.band(flags, 2) != 0,
          do: {n + byte_size(d), m + 1},
          else: count_active(ss, n + byte_size(d), m + 1)

      {:quic, :peer_send_shutdown, ^ss, _} ->
        {n, m}
    end
  end

  defp count_passive(ss, n, m) do
    case MaculaQuic.recv(ss, 0) do
      {:ok, d} -> count_passive(ss, n + byte_size(d), m + 1)
      {:error, :peer_send_shutdown} -> {n, m}
    end
  end

  @doc """
  Workload 1: `total` bytes over one stream; `mode` is :active or :passive, `stream_opts` are
  the receiving stream's further options (such as `read_ahead`).
  """
  def bulk(cert, total, mode, stream_opts \\ []) do
    {l, c, sc} = pair(cert)
    me = self()
    r = receiver(sc, mode, stream_opts, me)
    {:ok, before} = MaculaQuic.getstat(c, [:udp_tx_ios, :send_cnt])
    piece = :binary.copy(<<7>>, mib())
    faults0 = Bench.Util.minor_faults()
    Bench.Util.mark(:start)
    t0 = now_us()
    s = sender(c, total, piece, me)
    {n, msgs, t1} = receive(do: ({:received, ^r, n, m, t1} -> {n, m, t1}))
    Bench.Util.mark(:stop)
    faults = Bench.Util.minor_faults() - faults0
    {:ok, aft} = MaculaQuic.getstat(c, [:udp_tx_ios, :send_cnt])
    receive(do: ({:sent, ^s} -> :ok))
    if n != total, do: raise("bulk: received #{n} of #{total} bytes")
    ios = aft[:udp_tx_ios] - before[:udp_tx_ios]
    dgrams = aft[:send_cnt] - before[:send_cnt]
    for p <- [s, r], do: send(p, :stop)
    teardown(l, c, sc)
    us = t1 - t0

    %{
      bytes: n,
      seconds: us / 1.0e6,
      mib_s: Bench.Util.mib_s(n, us),
      messages: msgs,
      bytes_per_message: div(n, max(msgs, 1)),
      udp_tx_ios: ios,
      udp_tx_datagrams: dgrams,
      ios_per_datagram: ios / max(dgrams, 1),
      faults_per_mib: faults / (n / mib())
    }
  end

  @doc """
  Workload 2: `size`-byte echo round trips on one stream for `seconds`. `how` is :send (the
  blocking `send/2` on both sides) or :async_send (`async_send/2`, which returns at once).
  Both ends receive in active mode.
  """
  def echo(cert, size, seconds, how) do
    me = self()
    tx = if how == :send, do: &MaculaQuic.send/2, else: &MaculaQuic.async_send/2
    {l, c, sc, server, s} = echo_pair(cert, tx)
    msg = :binary.copy(<<1>>, size)
    for _ <- 1..100, do: round_trip(s, msg, size, tx)
    runs0 = MaculaQuic.native_counts()
    Bench.Util.mark(:start)
    stats = Bench.Util.time_round_trips(seconds, fn -> round_trip(s, msg, size, tx) end)
    Bench.Util.mark(:stop)
    runs1 = MaculaQuic.native_counts()
    send(server, :stop)
    _ = me
    teardown(l, c, sc)
    inline = runs1.inline_runs - runs0.inline_runs
    runtime = runs1.runtime_runs - runs0.runtime_runs

    n = max(stats.round_trips, 1)
    # Per round trip: shard runs done inside a process's own call (see "How the work is
    # scheduled" in README), and those a runtime worker did.
    Map.merge(stats, %{inline_runs_per_rt: inline / n, runtime_runs_per_rt: runtime / n})
  end

  @doc """
  Sparse request/response: `rate` paced `size`-byte round trips per second for `seconds` (the
  i-th starts at i/rate s, so the runtime goes idle in between), `async_send/2` on both ends.
  Returns the round trips, the wall time and the CPU clock ticks the VM used meanwhile
  (`Bench.Util.cpu_ticks/0`; bench/sparse_cpu.exs).
  """
  def echo_paced(cert, size, rate, seconds) do
    tx = &MaculaQuic.async_send/2
    {l, c, sc, server, s} = echo_pair(cert, tx)
    r = paced(s, size, rate, seconds, fn -> Bench.Util.cpu_ticks() end)
    send(server, :stop)
    teardown(l, c, sc)
    r
  end

  @doc """
  `echo_paced/4` with the echoing end in another OS process (`serve_echo/1`, listening on
  `port`, OS process `os_pid`): as a node serving peers elsewhere sees it. Returns the CPU
  ticks of this VM (`cpu_ticks`) and of the echoing one (`peer_cpu_ticks`) as well.
  """
  def echo_paced_remote(port, os_pid, size, rate, seconds) do
    c = connect(port)
    {:ok, s} = MaculaQuic.open_stream(c, active: true)
    peer_stat = "/proc/#{os_pid}/stat"
    ticks = fn -> {Bench.Util.cpu_ticks(), Bench.Util.cpu_ticks(peer_stat)} end
    r = paced(s, size, rate, seconds, ticks)
    :ok = MaculaQuic.close_connection(c)
    {own, peer} = r.cpu_ticks
    %{r | cpu_ticks: own} |> Map.put(:peer_cpu_ticks, peer)
  end

  # The paced loop of echo_paced/4 and echo_paced_remote/5 on the client stream `s`; `ticks`
  # reads the CPU clock(s) around it (a number, or a tuple of numbers).
  defp paced(s, size, rate, seconds, ticks) do
    tx = &MaculaQuic.async_send/2
    msg = :binary.copy(<<1>>, size)
    for _ <- 1..50, do: round_trip(s, msg, size, tx)
    n = round(rate * seconds)
    ticks0 = ticks.()
    t0 = now_us()

    for i <- 1..n do
      round_trip(s, msg, size, tx)
      wait_ms = div(t0 + div(i * 1_000_000, rate) - now_us(), 1000)
      if wait_ms > 0, do: Process.sleep(wait_ms)
    end

    wall_us = now_us() - t0
    %{round_trips: n, wall_us: wall_us, cpu_ticks: diff_ticks(ticks.(), ticks0)}
  end

  defp diff_ticks({a, b}, {a0, b0}), do: {a - a0, b - b0}
  defp diff_ticks(a, a0), do: a - a0

  # A connection whose accepting end echoes, with `tx`, what arrives on the stream the other end
  # opens: `{listener, client connection, server connection, echoing process, client stream}`.
  defp echo_pair(cert, tx) do
    {l, c, sc} = pair(cert)

    server =
      spawn_link(fn ->
        :ok = MaculaQuic.async_accept_stream(sc, active: true)
        ss = receive(do: ({:quic, :new_stream, ss, _} -> ss))
        echo_loop(ss, tx)
      end)

    {:ok, s} = MaculaQuic.open_stream(c, active: true)
    {l, c, sc, server, s}
  end

  defp round_trip(s, msg, size, tx) do
    :ok = tx.(s, msg)
    await_bytes(s, size)
  end

  defp await_bytes(_s, left) when left <= 0, do: :ok

  defp await_bytes(s, left) do
    receive do
      {:quic, d, ^s, _} when is_binary(d) -> await_bytes(s, left - byte_size(d))
    end
  end

  defp echo_loop(ss, tx) do
    receive do
      {:quic, d, ^ss, _} when is_binary(d) ->
        :ok = tx.(ss, d)
        echo_loop(ss, tx)

      :stop ->
        :ok

      _ ->
        echo_loop(ss, tx)
    end
  end

  @doc """
  Datagram echo: `size`-byte QUIC datagram round trips on one connection for `seconds`, the
  accepting end's owner (a process of its own) echoing each with `send_dgram/2`. A datagram not
  back within a second counts as lost (`:lost`) and the next one goes; over loopback with one
  in flight none is.
  """
  def dgram_echo(cert, size, seconds) do
    on = [datagram_receive_enabled: true]
    {l, port} = listen(cert, on)
    :ok = MaculaQuic.async_accept(l)
    c = connect(port, on)
    sc = receive(do: ({:quic, :new_conn, sc, _} -> sc))

    server =
      spawn_link(fn ->
        receive(do: (:go -> :ok))
        dgram_echo_loop(sc)
      end)

    :ok = MaculaQuic.controlling_process(sc, server)
    send(server, :go)
    msg = :binary.copy(<<1>>, size)
    Process.put(:dgram_lost, 0)
    for _ <- 1..100, do: dgram_round_trip(c, msg)
    Process.put(:dgram_lost, 0)
    stats = Bench.Util.time_round_trips(seconds, fn -> dgram_round_trip(c, msg) end)
    lost = Process.delete(:dgram_lost)
    send(server, :stop)
    teardown(l, c, sc)
    Map.put(stats, :lost, lost)
  end

  defp dgram_round_trip(c, msg) do
    :ok = MaculaQuic.send_dgram(c, msg)

    receive do
      {:quic, ^msg, ^c, 0} -> :ok
    after
      1_000 -> Process.put(:dgram_lost, Process.get(:dgram_lost) + 1)
    end
  end

  defp dgram_echo_loop(sc) do
    receive do
      {:quic, d, ^sc, 0} when is_binary(d) ->
        :ok = MaculaQuic.send_dgram(sc, d)
        dgram_echo_loop(sc)

      :stop ->
        :ok

      _ ->
        dgram_echo_loop(sc)
    end
  end

  @doc """
  Workload 2 with the echoing end in another OS process (`serve_echo/1`, listening on `port`):
  `size`-byte round trips from this VM for `seconds`, `async_send/2` on both ends.
  """
  def echo_remote(port, size, seconds) do
    c = connect(port)
    {:ok, s} = MaculaQuic.open_stream(c, active: true)
    msg = :binary.copy(<<1>>, size)
    tx = &MaculaQuic.async_send/2
    for _ <- 1..100, do: round_trip(s, msg, size, tx)
    stats = Bench.Util.time_round_trips(seconds, fn -> round_trip(s, msg, size, tx) end)
    :ok = MaculaQuic.close_connection(c)
    stats
  end

  @doc """
  The echoing end for `echo_remote/3`, run in its own OS process by bench/echo_server.exs:
  prints `{"port":N}`, then echoes every stream of each connection (one connection at a time)
  until standard input closes.
  """
  def serve_echo(cert), do: serve_until_eof(cert, &serve_echo_loop/1)

  @doc """
  The serving end of a benchmark run in a second VM (see `Bench.Util.with_server/2`): listens
  with `cert`, runs `serve.(listener)` in a linked process, prints `{"port":N}`, and halts the
  VM once standard input closes (the measuring VM closes it when it is done).
  """
  def serve_until_eof(cert, serve) do
    {l, port} = listen(cert)
    spawn_link(fn -> serve.(l) end)
    IO.puts(~s({"port":#{port}}))
    _ = IO.read(:stdio, :eof)
    System.halt(0)
  end

  defp serve_echo_loop(l) do
    :ok = MaculaQuic.async_accept(l)
    c = receive(do: ({:quic, :new_conn, c, _} -> c))
    :ok = MaculaQuic.async_accept_stream(c, active: true)
    relay(c)
    serve_echo_loop(l)
  end

  # Echoes data on any stream of `c` until `c` has closed (new_stream and the like are ignored).
  defp relay(c) do
    receive do
      {:quic, d, s, _} when is_binary(d) ->
        _ = MaculaQuic.async_send(s, d)
        relay(c)

      {:quic, :closed, ^c, _} ->
        :ok

      _ ->
        relay(c)
    end
  end

  @doc "Workload 3: `streams` concurrent streams of `per` bytes each on one connection."
  def fanout(cert, streams, per, listen_opts \\ []) do
    {l, c, sc} = pair(cert, listen_opts)
    me = self()
    receivers = for _ <- 1..streams, do: receiver(sc, :active, [], me)
    piece = :binary.copy(<<7>>, min(per, mib()))
    t0 = now_us()
    senders = for _ <- 1..streams, do: sender(c, per, piece, me)

    {total, t1} =
      Enum.reduce(receivers, {0, t0}, fn r, {acc, t} ->
        receive(do: ({:received, ^r, n, _m, t1} -> {acc + n, max(t, t1)}))
      end)

    for s <- senders, do: receive(do: ({:sent, ^s} -> :ok))
    if total != streams * per, do: raise("fanout: received #{total} of #{streams * per} bytes")
    # How often flow control held the sender back, as the receiving end heard it.
    {:ok, [data_blocked_rx: blocked, stream_data_blocked_rx: stream_blocked]} =
      MaculaQuic.getstat(sc, [:data_blocked_rx, :stream_data_blocked_rx])

    for p <- senders ++ receivers, do: send(p, :stop)
    teardown(l, c, sc)
    us = t1 - t0

    %{
      streams: streams,
      bytes: total,
      seconds: us / 1.0e6,
      mib_s: Bench.Util.mib_s(total, us),
      data_blocked: blocked,
      stream_data_blocked: stream_blocked
    }
  end

  @doc "Workload 4: connect + close_connection, `conc` at a time, for `seconds`."
  def handshake(cert, conc, seconds) do
    {l, port} = listen(cert)
    acceptor = spawn_link(fn -> accept_loop(l) end)
    # Warm-up.
    for _ <- 1..20, do: :ok = MaculaQuic.close_connection(connect(port, @full_handshake))
    me = self()
    resumed0 = MaculaQuic.native_counts().tls_resumptions
    Bench.Util.mark(:start)
    t0 = now_us()
    deadline = t0 + round(seconds * 1.0e6)

    workers =
      for _ <- 1..conc do
        spawn_link(fn -> send(me, {:count, self(), hs_loop(port, deadline, 0)}) end)
      end

    n = Enum.reduce(workers, 0, fn w, acc -> receive(do: ({:count, ^w, k} -> acc + k)) end)
    us = now_us() - t0
    Bench.Util.mark(:stop)
    resumed = MaculaQuic.native_counts().tls_resumptions - resumed0
    send(acceptor, :stop)
    MaculaQuic.close_listener(l)

    %{
      concurrency: conc,
      handshakes: n,
      seconds: us / 1.0e6,
      hs_s: n / (us / 1.0e6),
      resumptions_per_hs: resumed / max(n, 1)
    }
  end

  defp hs_loop(port, deadline, n) do
    if now_us() >= deadline do
      n
    else
      :ok = MaculaQuic.close_connection(connect(port, @full_handshake))
      hs_loop(port, deadline, n + 1)
    end
  end

  @doc """
  Accepts connections on `l` for as long as it is open, or until the process gets `:stop`,
  dropping every other message (the accepted connections' own messages): the accepting end of
  the handshake workloads.
  """
  def accept_loop(l) do
    # The listener may be closed under us at the end of a run while a last new_conn was
    # still on its way here.
    case MaculaQuic.async_accept(l) do
      :ok -> accept_wait(l)
      {:error, :closed} -> :ok
    end
  end

  defp accept_wait(l) do
    receive do
      {:quic, :new_conn, _c, _} -> accept_loop(l)
      :stop -> :ok
      _other -> accept_wait(l)
    end
  end
end
