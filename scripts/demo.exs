# The main job (run it with bin/demo): macula_quic on loopback, end to end.
#
#   * three listeners on ONE UDP port, each bound to its own address — two IPv4 identities
#     (127.0.0.1, 127.0.0.2) and one IPv6 (::1) — each answering with its own name;
#   * a client connects to each identity, echoes messages on several streams at once, and
#     reports handshake time, echo round trips and Quinn's connection counters (getstat);
#   * an identity dials another from its own source address (connect's :local_address);
#   * 256 MiB move over one stream, checked end to end with SHA-256, with the throughput;
#   * everything is closed and the native side is checked to hold nothing any more.
#
# Environment: DEMO_BULK_MIB (default 256), DEMO_STREAMS (8), DEMO_MESSAGES (16).
#
# Wire protocol between the demo's client and server, per stream: the client's first 4 bytes
# say what the stream is for — "ECHO" (echo every byte after it), "NAME" (answer with the
# identity's name and how it sees the caller's address) or "BULK" (count and hash everything
# until FIN, then answer "<bytes> <sha256 hex>").

defmodule Demo do
  @alpn ["macula-demo"]
  @wait 15_000

  def main do
    bulk_mib = env_int("DEMO_BULK_MIB", 256)
    n_streams = env_int("DEMO_STREAMS", 8)
    n_messages = env_int("DEMO_MESSAGES", 16)
    {:ok, _} = Application.ensure_all_started(:crypto)
    {:ok, _} = Application.ensure_all_started(:macula_quic)

    identities = [
      {"identity-a", "127.0.0.1"},
      {"identity-b", "127.0.0.2"},
      {"identity-v6", "::1"}
    ]

    say(
      "starting #{length(identities)} listeners on one port (self-signed certificates: demo only)"
    )

    {port, listeners} = start_listeners(identities)
    say("listening on port #{port}: " <> Enum.map_join(identities, ", ", &elem(&1, 1)))

    # One throwaway round first, so the first row does not pay for warming up (code loading,
    # runtime threads, allocator pools).
    _ = client_round("identity-a", "127.0.0.1", port, n_streams, n_messages)

    rows =
      for {name, ip} <- identities do
        say(
          "#{name}: connecting to #{fmt_addr(ip, port)}, echoing #{n_streams} streams x #{n_messages} messages"
        )

        client_round(name, ip, port, n_streams, n_messages)
      end

    say("identity-a dials identity-b from its own address (local_address: \"127.0.0.1\")")
    dial = dial_from_identity(port)

    say("moving #{bulk_mib} MiB over one stream to identity-a (SHA-256 checked at both ends)")
    bulk = bulk_transfer("127.0.0.1", port, bulk_mib)

    Enum.each(listeners, fn {_, l, server} ->
      :ok = MaculaQuic.close_listener(l)
      Process.exit(server, :kill)
    end)

    counts = settle()
    report(port, rows, dial, bulk, counts)
    if counts.connections + counts.streams + counts.listeners > 0, do: System.halt(1)
  end

  ## Server side

  defp start_listeners([{first_name, first_ip} | rest]) do
    {first_l, first_server} = start_listener(first_name, first_ip, 0)
    {:ok, {_, port}} = MaculaQuic.sockname(first_l)

    others =
      for {name, ip} <- rest do
        {l, server} = start_listener(name, ip, port)
        {name, l, server}
      end

    {port, [{first_name, first_l, first_server} | others]}
  end

  defp start_listener(name, ip, port) do
    case MaculaQuic.listen(ip, port, alpn: @alpn, peer_bidi_stream_count: 100) do
      {:ok, l} ->
        server = spawn(fn -> acceptor(name, l) end)
        :ok = MaculaQuic.controlling_process(l, server)
        send(server, :go)
        {l, server}

      {:error, reason} ->
        fail("could not listen on #{fmt_addr(ip, port)}: #{inspect(reason)}")
    end
  end

  defp acceptor(name, l) do
    receive do: (:go -> :ok)
    accept_loop(name, l)
  end

  defp accept_loop(name, l) do
    case MaculaQuic.accept(l, [], :infinity) do
      {:ok, conn} ->
        pid = spawn(fn -> serve_conn(name, conn) end)
        :ok = MaculaQuic.controlling_process(conn, pid)
        send(pid, :go)
        accept_loop(name, l)

      {:error, _closed} ->
        :ok
    end
  end

  defp serve_conn(name, conn) do
    receive do: (:go -> :ok)
    :ok = MaculaQuic.async_accept_stream(conn, active: false)
    conn_loop(name, conn)
  end

  defp conn_loop(name, conn) do
    receive do
      {:quic, :new_stream, stream, _props} ->
        # One process per stream: handoff_stream forwards anything already queued for us. The
        # new owner waits for the word before it touches the stream: a mode it set before the
        # handoff began would be replaced by the handoff's own `active: false`.
        pid = spawn(fn -> receive(do: (:go -> serve_stream(name, conn, stream))) end)
        :ok = MaculaQuic.handoff_stream(stream, pid, active: false)
        send(pid, :go)
        :ok = MaculaQuic.async_accept_stream(conn, active: false)
        conn_loop(name, conn)

      {:quic, :closed, ^conn, _} ->
        :ok

      {:quic, _, _, _} ->
        conn_loop(name, conn)
    end
  end

  defp serve_stream(name, conn, stream) do
    case MaculaQuic.recv(stream, 4, @wait) do
      {:ok, "ECHO"} ->
        :ok = MaculaQuic.setopt(stream, :active, 16)
        echo(stream)

      {:ok, "NAME"} ->
        {:ok, {ip, port}} = MaculaQuic.peername(conn)
        :ok = MaculaQuic.send(stream, "#{name} sees you as #{fmt_addr(ip, port)}", 4)

      {:ok, "BULK"} ->
        :ok = MaculaQuic.setopt(stream, :active, 16)
        bulk_sink(stream, 0, :crypto.hash_init(:sha256))

      _ ->
        MaculaQuic.close_stream(stream)
    end
  end

  defp echo(stream) do
    receive do
      {:quic, data, ^stream, _flags} when is_binary(data) ->
        :ok = MaculaQuic.async_send(stream, data)
        echo(stream)

      {:quic, :passive, ^stream, _} ->
        :ok = MaculaQuic.setopt(stream, :active, 16)
        echo(stream)

      {:quic, :peer_send_shutdown, ^stream, _} ->
        MaculaQuic.async_shutdown_stream(stream, MaculaQuic.stream_shutdown_graceful(), 0)

      {:quic, _, ^stream, _} ->
        :ok
    end
  end

  defp bulk_sink(stream, bytes, sha) do
    receive do
      {:quic, data, ^stream, _flags} when is_binary(data) ->
        bulk_sink(stream, bytes + byte_size(data), :crypto.hash_update(sha, data))

      {:quic, :passive, ^stream, _} ->
        :ok = MaculaQuic.setopt(stream, :active, 16)
        bulk_sink(stream, bytes, sha)

      {:quic, :peer_send_shutdown, ^stream, _} ->
        digest = Base.encode16(:crypto.hash_final(sha), case: :lower)
        :ok = MaculaQuic.send(stream, "#{bytes} #{digest}", 4)

      {:quic, _, ^stream, _} ->
        :ok
    end
  end

  ## Client side

  defp connect!(ip, port, extra \\ []) do
    opts = [alpn: @alpn, verify: :none] ++ extra

    case MaculaQuic.connect(ip, port, opts, @wait) do
      {:ok, conn} -> conn
      {:error, reason} -> fail("connect to #{fmt_addr(ip, port)} failed: #{inspect(reason)}")
    end
  end

  defp client_round(name, ip, port, n_streams, n_messages) do
    {handshake_us, conn} = :timer.tc(fn -> connect!(ip, port) end)
    answer = ask_name(conn)
    unless String.starts_with?(answer, name <> " "), do: fail("#{ip} answered #{inspect(answer)}")

    # Each stream is opened and driven by its own process (its owner), all at once.
    parent = self()

    {echo_us, latencies} =
      :timer.tc(fn ->
        1..n_streams
        |> Enum.map(fn i ->
          spawn_link(fn -> send(parent, {:echoed, self(), echo_stream(conn, i, n_messages)}) end)
        end)
        |> Enum.flat_map(fn pid -> receive(do: ({:echoed, ^pid, lat} -> lat)) end)
      end)

    {:ok, stats} = MaculaQuic.getstat(conn, [:send_cnt, :send_oct, :recv_cnt, :recv_oct, :rtt_us])
    :ok = MaculaQuic.close_connection(conn)

    %{
      name: name,
      addr: fmt_addr(ip, port),
      handshake_ms: handshake_us / 1000,
      round_trips: length(latencies),
      echo_per_s: length(latencies) / max(echo_us, 1) * 1_000_000,
      p50_us: percentile(latencies, 0.5),
      stats: Map.new(stats)
    }
  end

  defp ask_name(conn) do
    {:ok, s} = MaculaQuic.open_stream(conn, active: false)
    :ok = MaculaQuic.send(s, "NAME", 4)
    read_all(s, [])
  end

  # Sends n messages of varied sizes, waiting for each echo; returns round-trip times (µs).
  defp echo_stream(conn, i, n) do
    {:ok, s} = MaculaQuic.open_stream(conn, active: false)
    :ok = MaculaQuic.send(s, "ECHO")

    lat =
      for j <- 1..n do
        msg = :crypto.strong_rand_bytes(rem(i * 977 + j * 131, 4096) + 1)

        {us, echoed} =
          :timer.tc(fn ->
            :ok = MaculaQuic.send(s, msg)
            recv_exact(s, byte_size(msg))
          end)

        if echoed != msg, do: fail("echo mismatch on stream #{i}")
        us
      end

    :ok = MaculaQuic.async_shutdown_stream(s, MaculaQuic.stream_shutdown_graceful(), 0)
    lat
  end

  defp recv_exact(s, n) do
    case MaculaQuic.recv(s, n, @wait) do
      {:ok, data} -> data
      {:error, reason} -> fail("recv failed: #{inspect(reason)}")
    end
  end

  defp read_all(s, acc) do
    case MaculaQuic.recv(s, 0, @wait) do
      {:ok, data} -> read_all(s, [acc, data])
      {:error, :peer_send_shutdown} -> IO.iodata_to_binary(acc)
      {:error, reason} -> fail("recv failed: #{inspect(reason)}")
    end
  end

  defp dial_from_identity(port) do
    conn = connect!("127.0.0.2", port, local_address: "127.0.0.1")
    {:ok, {src, _}} = MaculaQuic.sockname(conn)
    answer = ask_name(conn)
    :ok = MaculaQuic.close_connection(conn)
    if src != "127.0.0.1", do: fail("local_address not honoured: source #{src}")
    answer
  end

  defp bulk_transfer(ip, port, mib) do
    conn = connect!(ip, port)
    {:ok, s} = MaculaQuic.open_stream(conn, active: false)
    block = :crypto.strong_rand_bytes(1_048_576)
    :ok = MaculaQuic.send(s, "BULK")

    {us, sha} =
      :timer.tc(fn ->
        sha =
          Enum.reduce(1..mib//1, :crypto.hash_init(:sha256), fn i, sha ->
            :ok = MaculaQuic.send(s, block)
            if rem(i, 64) == 0, do: say("  #{i} MiB sent")
            :crypto.hash_update(sha, block)
          end)

        :ok = MaculaQuic.send(s, "", 4)
        # The answer comes once the server has read (and hashed) everything.
        {Base.encode16(:crypto.hash_final(sha), case: :lower), read_all(s, [])}
      end)

    {ours, answer} = sha
    {:ok, stats} = MaculaQuic.getstat(conn, [:send_cnt, :send_oct, :udp_tx_ios, :lost_packets])
    :ok = MaculaQuic.close_connection(conn)
    expected = "#{mib * 1_048_576} #{ours}"
    if answer != expected, do: fail("bulk mismatch: sent #{expected}, server saw #{answer}")

    %{
      mib: mib,
      seconds: us / 1_000_000,
      mib_per_s: mib / max(us, 1) * 1_000_000,
      sha: ours,
      stats: Map.new(stats)
    }
  end

  ## Reporting

  # A message still in a mailbox keeps the handle it names alive (like any term), so read the
  # notices nobody waited for (stream_closed after a finished stream, ...) before counting.
  defp settle(deadline \\ System.monotonic_time(:millisecond) + 10_000) do
    flush_notices()
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    counts = MaculaQuic.native_counts()

    cond do
      counts.connections + counts.streams + counts.listeners == 0 -> counts
      System.monotonic_time(:millisecond) > deadline -> counts
      true -> receive(after: (50 -> settle(deadline)))
    end
  end

  defp flush_notices do
    receive do
      {:quic, _, _, _} -> flush_notices()
    after
      0 -> :ok
    end
  end

  defp report(port, rows, dial, bulk, counts) do
    IO.puts("""

    macula_quic demo — #{length(rows)} listeners sharing UDP port #{port}, one per address
    #{machine()}

    | identity    | listener            | handshake | echo round trips      | p50 RTT  | datagrams out/in | bytes out/in        | Quinn RTT |
    |-------------|---------------------|----------:|-----------------------|---------:|-----------------:|---------------------|----------:|\
    """)

    for r <- rows do
      s = r.stats

      IO.puts(
        "| #{pad(r.name, 11)} | #{pad(r.addr, 19)} | #{lpad(f1(r.handshake_ms) <> " ms", 9)} | " <>
          "#{pad("#{r.round_trips} (#{round(r.echo_per_s)}/s)", 21)} | #{lpad("#{round(r.p50_us)} µs", 8)} | " <>
          "#{lpad("#{s.send_cnt}/#{s.recv_cnt}", 16)} | #{pad("#{s.send_oct}/#{s.recv_oct}", 19)} | " <>
          "#{lpad("#{s.rtt_us} µs", 9)} |"
      )
    end

    b = bulk.stats

    IO.puts("""

    dial-out:  #{dial}
    bulk:      #{bulk.mib} MiB to identity-a in #{f1(bulk.seconds)} s = #{round(bulk.mib_per_s)} MiB/s, SHA-256 #{String.slice(bulk.sha, 0, 16)}… matches at both ends
               #{b.send_cnt} datagrams in #{b.udp_tx_ios} sendmsg calls (#{f1(b.send_cnt / max(b.udp_tx_ios, 1))} per call: segmentation offload), #{b.lost_packets} lost
    shutdown:  native side holds #{counts.listeners} listeners, #{counts.connections} connections, #{counts.streams} streams
    """)
  end

  defp machine do
    cpus = :erlang.system_info(:logical_processors_available)

    "OTP #{System.otp_release()}, Elixir #{System.version()}, #{if is_integer(cpus), do: cpus, else: "?"} CPUs"
  end

  defp percentile([], _), do: 0
  defp percentile(xs, p), do: Enum.at(Enum.sort(xs), min(length(xs) - 1, trunc(length(xs) * p)))

  defp fmt_addr(ip, port) do
    if String.contains?(ip, ":"), do: "[#{ip}]:#{port}", else: "#{ip}:#{port}"
  end

  defp f1(x), do: :erlang.float_to_binary(x / 1, decimals: 1)
  defp pad(s, n), do: String.pad_trailing(s, n)
  defp lpad(s, n), do: String.pad_leading(s, n)
  defp say(msg), do: IO.puts(:stderr, "[demo] " <> msg)

  defp env_int(name, default) do
    case Integer.parse(System.get_env(name, "")) do
      {n, ""} when n > 0 -> n
      _ -> default
    end
  end

  defp fail(msg) do
    IO.puts(:stderr, "[demo] FAILED: " <> msg)
    System.halt(1)
  end
end

Demo.main()
