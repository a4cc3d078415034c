defmodule Bench.Tcp do
  @moduledoc false
  # Workloads 1, 2 and 4 over OTP's :gen_tcp and :ssl (TLS 1.3 only, the bench's certificate,
  # client verify_none), both ends in this VM. `t` is :gen_tcp or :ssl.
  import Bench.Util, only: [now_us: 0, mib: 0]

  @active_n 64

  # A 64 KiB user-level buffer (OTP's default is 1460 bytes, one TCP segment per message), so
  # :gen_tcp is not handicapped in bulk; :ssl delivers one 16 KiB record per message anyway.
  defp base, do: [:binary, active: false, nodelay: true, reuseaddr: true, buffer: 65_536]

  defp server_opts(:gen_tcp, _cert), do: base() ++ [backlog: 1024]

  defp server_opts(:ssl, cert),
    do:
      base() ++
        [
          backlog: 1024,
          versions: [:"tlsv1.3"],
          certfile: String.to_charlist(cert.certfile),
          keyfile: String.to_charlist(cert.keyfile),
          alpn_preferred_protocols: ["bench"]
        ]

  defp client_opts(:gen_tcp), do: [:binary, active: false, nodelay: true, buffer: 65_536]

  defp client_opts(:ssl),
    do:
      client_opts(:gen_tcp) ++
        [versions: [:"tlsv1.3"], verify: :verify_none, alpn_advertised_protocols: ["bench"]]

  defp listen(t, cert) do
    {:ok, ls} = t.listen(0, server_opts(t, cert))
    {:ok, {_, port}} = sockname(t, ls)
    {ls, port}
  end

  defp sockname(:gen_tcp, s), do: :inet.sockname(s)
  defp sockname(:ssl, s), do: :ssl.sockname(s)

  defp accept(:gen_tcp, ls), do: :gen_tcp.accept(ls)

  defp accept(:ssl, ls) do
    with {:ok, t} <- :ssl.transport_accept(ls), do: :ssl.handshake(t, 5_000)
  end

  defp connect(t, port, extra \\ []),
    do: t.connect(~c"127.0.0.1", port, client_opts(t) ++ extra, 5_000)

  defp setopts(:gen_tcp, s, o), do: :inet.setopts(s, o)
  defp setopts(:ssl, s, o), do: :ssl.setopts(s, o)

  defp controlling_process(:gen_tcp, s, p), do: :gen_tcp.controlling_process(s, p)
  defp controlling_process(:ssl, s, p), do: :ssl.controlling_process(s, p)

  # A listener and one connected pair of sockets (client, server), both owned by the caller.
  defp pair(t, cert) do
    {ls, port} = listen(t, cert)
    me = self()

    spawn_link(fn ->
      {:ok, s} = accept(t, ls)
      :ok = controlling_process(t, s, me)
      send(me, {:accepted, s})
    end)

    {:ok, c} = connect(t, port)
    s = receive(do: ({:accepted, s} -> s))
    {ls, c, s}
  end

  defp teardown(t, ls, c, s) do
    t.close(c)
    t.close(s)
    t.close(ls)
    Bench.Util.flush()
  end

  @doc """
  What one `:ssl` connection with the benchmark's options negotiates: `"cipher/prf"` (such as
  `"aes_256_gcm/sha384"`) and the group the client offers a key share for, OTP's first default
  one (OTP 25 does not report the group a TLS 1.3 connection used). bin/bench prints it next
  to raw Quinn's (`quinn_baseline suite`), so that the comparison's cryptography is on record.
  """
  def ssl_suite(cert) do
    {ls, c, s} = pair(:ssl, cert)
    info = :ssl.connection_information(c, [:selected_cipher_suite])
    teardown(:ssl, ls, c, s)

    suite =
      case info do
        {:ok, [selected_cipher_suite: %{cipher: cipher, prf: prf}]} -> "#{cipher}/#{prf}"
        other -> "unknown (#{inspect(other)})"
      end

    "#{suite}, #{hd(:ssl.groups(:default))} offered"
  end

  @doc "Workload 1: `total` bytes one way; the receiver uses {active, N} or passive recv."
  def bulk(t, cert, total, mode) do
    {ls, c, s} = pair(t, cert)
    me = self()

    r =
      spawn_link(fn ->
        receive(do: (:go -> :ok))

        {n, m} =
          if mode == :active,
            do: count_active(t, s, total, 0, 0),
            else: count_passive(t, s, total, 0, 0)

        send(me, {:received, self(), n, m, now_us()})
        receive(do: (:stop -> :ok))
      end)

    :ok = controlling_process(t, s, r)
    send(r, :go)
    piece = :binary.copy(<<7>>, mib())
    t0 = now_us()

    snd =
      spawn_link(fn ->
        receive(do: (:go -> :ok))
        full = div(total, mib())
        Enum.each(1..full//1, fn _ -> :ok = t.send(c, piece) end)
        rest = total - full * mib()
        if rest > 0, do: :ok = t.send(c, binary_part(piece, 0, rest))
        receive(do: (:stop -> :ok))
      end)

    :ok = controlling_process(t, c, snd)
    send(snd, :go)
    {n, msgs, t1} = receive(do: ({:received, ^r, n, m, t1} -> {n, m, t1}))
    for p <- [r, snd], do: send(p, :stop)
    teardown(t, ls, c, s)
    us = t1 - t0

    %{
      bytes: n,
      seconds: us / 1.0e6,
      mib_s: Bench.Util.mib_s(n, us),
      messages: msgs,
      bytes_per_message: div(n, max(msgs, 1))
    }
  end

  defp count_active(t, s, total, n, m) do
    :ok = setopts(t, s, active: @active_n)
    count_active_loop(t, s, total, n, m)
  end

  defp count_active_loop(_t, _s, total, n, m) when n >= total, do: {n, m}

  defp count_active_loop(t, s, total, n, m) do
    receive do
      {tag, ^s, d} when tag in [:tcp, :ssl] ->
        count_active_loop(t, s, total, n + byte_size(d), m + 1)

      {tag, ^s} when tag in [:tcp_passive, :ssl_passive] ->
        count_active(t, s, total, n, m)
    end
  end

  defp count_passive(_t, _s, total, n, m) when n >= total, do: {n, m}

  defp count_passive(t, s, total, n, m) do
    {:ok, d} = t.recv(s, 0)
    count_passive(t, s, total, n + byte_size(d), m + 1)
  end

  @doc "Workload 2: `size`-byte echo round trips for `seconds`; both ends in active mode."
  def echo(t, cert, size, seconds) do
    {ls, c, s} = pair(t, cert)

    server =
      spawn_link(fn ->
        receive(do: (:go -> :ok))
        :ok = setopts(t, s, active: true)
        echo_loop(t, s)
      end)

    :ok = controlling_process(t, s, server)
    send(server, :go)
    :ok = setopts(t, c, active: true)
    msg = :binary.copy(<<1>>, size)
    for _ <- 1..100, do: round_trip(t, c, msg, size)
    stats = Bench.Util.time_round_trips(seconds, fn -> round_trip(t, c, msg, size) end)
    send(server, :stop)
    teardown(t, ls, c, s)
    stats
  end

  defp round_trip(t, c, msg, size) do
    :ok = t.send(c, msg)
    await_bytes(c, size)
  end

  defp await_bytes(_c, left) when left <= 0, do: :ok

  defp await_bytes(c, left) do
    receive do
      {tag, ^c, d} when tag in [:tcp, :ssl] -> await_bytes(c, left - byte_size(d))
    end
  end

  defp echo_loop(t, s) do
    receive do
      {tag, ^s, d} when tag in [:tcp, :ssl] ->
        :ok = t.send(s, d)
        echo_loop(t, s)

      :stop ->
        :ok

      _ ->
        echo_loop(t, s)
    end
  end

  @doc """
  Workload 4: connect + close, `conc` at a time, for `seconds`. The client closes with
  SO_LINGER 0 (RST), so thousands of connections per second leave no TIME_WAIT behind to
  exhaust loopback ports. The server accepts with a pool of acceptor processes.
  """
  def handshake(t, cert, conc, seconds) do
    {ls, port} = listen(t, cert)
    acceptors = for _ <- 1..(conc + 4), do: spawn(fn -> accept_loop(t, ls) end)
    for _ <- 1..20, do: one(t, port)
    me = self()
    t0 = now_us()
    deadline = t0 + round(seconds * 1.0e6)

    workers =
      for _ <- 1..conc,
          do: spawn_link(fn -> send(me, {:count, self(), hs_loop(t, port, deadline, 0)}) end)

    n = Enum.reduce(workers, 0, fn w, acc -> receive(do: ({:count, ^w, k} -> acc + k)) end)
    us = now_us() - t0
    for a <- acceptors, do: Process.exit(a, :kill)
    t.close(ls)
    %{concurrency: conc, handshakes: n, seconds: us / 1.0e6, hs_s: n / (us / 1.0e6)}
  end

  defp one(t, port) do
    {:ok, c} = connect(t, port, linger: {true, 0})
    :ok = t.close(c)
  end

  defp hs_loop(t, port, deadline, n) do
    if now_us() >= deadline do
      n
    else
      one(t, port)
      hs_loop(t, port, deadline, n + 1)
    end
  end

  defp accept_loop(t, ls) do
    case accept(t, ls) do
      {:ok, s} -> t.close(s)
      _ -> :ok
    end

    accept_loop(t, ls)
  end
end
