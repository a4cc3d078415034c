defmodule MaculaQuic.PerIdentityHelpers do
  @moduledoc false
  # Helpers for test/per_identity_test.exs: an accepting/echoing server process per listener,
  # client-side probes, extra IPv6 addresses on `lo`, and counting the VM's UDP sockets.

  @alpn ["per-identity"]
  @client_opts [alpn: @alpn, verify: :none]

  def alpn, do: @alpn
  def client_opts(extra \\ []), do: @client_opts ++ extra

  ## Server side

  @doc """
  Starts a process (linked to the caller) that accepts every connection of `listener`, one
  `async_accept` per connection, and serves its streams: a stream whose data is `"who?"` gets
  `label` back (then FIN); any other data is echoed.

  With `notify: pid`, each accepted connection is reported as
  `{:accepted, label, info, peername, server_conn}`, and each server connection's end as
  `{:server_closed, label, server_conn}`.
  """
  def serve(listener, label, opts \\ []) do
    notify = Keyword.get(opts, :notify)

    spawn_link(fn ->
      :ok = MaculaQuic.async_accept(listener)
      loop(listener, label, notify)
    end)
  end

  defp loop(listener, label, notify) do
    receive do
      {:quic, :new_conn, conn, info} ->
        if notify do
          {:ok, peer} = MaculaQuic.peername(conn)
          send(notify, {:accepted, label, info, peer, conn})
        end

        _ = MaculaQuic.async_accept_stream(conn)
        # {:error, :closed} once the listener is closed: nothing more will come.
        _ = MaculaQuic.async_accept(listener)
        loop(listener, label, notify)

      {:quic, :new_stream, _stream, %{conn: conn}} ->
        _ = MaculaQuic.async_accept_stream(conn)
        loop(listener, label, notify)

      {:quic, "who?", stream, _flags} ->
        _ = MaculaQuic.send(stream, label, 4)
        loop(listener, label, notify)

      {:quic, data, stream, _flags} when is_binary(data) ->
        _ = MaculaQuic.async_send(stream, data)
        loop(listener, label, notify)

      # (Not an accept's `{:quic, :closed, :undefined, :undefined}`: the next clause drops it.)
      {:quic, :closed, conn, _props} when is_reference(conn) ->
        if notify, do: send(notify, {:server_closed, label, conn})
        loop(listener, label, notify)

      {:quic, _event, _handle, _props} ->
        loop(listener, label, notify)

      {:stop, from} ->
        send(from, {:stopped, self()})
    end
  end

  ## Client side

  @doc "Asks the server behind `conn` which listener it is (see `serve/3`)."
  def who(conn, timeout \\ 5_000) do
    {:ok, stream} = MaculaQuic.open_stream(conn, active: false)
    :ok = MaculaQuic.send(stream, "who?", 4)
    {:ok, label} = MaculaQuic.recv(stream, 0, timeout)
    label
  end

  @doc "Sends `data` on a new stream and returns what comes back (`byte_size(data)` bytes)."
  def echo(conn, data, timeout \\ 5_000) do
    with {:ok, stream} <- MaculaQuic.open_stream(conn, active: false),
         :ok <- MaculaQuic.send(stream, data),
         {:ok, back} <- MaculaQuic.recv(stream, byte_size(data), timeout) do
      MaculaQuic.close_stream(stream)
      back
    end
  end

  @doc "`\"ip:port\"` as `new_conn` info spells it."
  def addr_string(ip, port) do
    if String.contains?(ip, ":"), do: "[#{ip}]:#{port}", else: "#{ip}:#{port}"
  end

  @doc "The source IP the kernel picks to reach `ip` from a wildcard-bound UDP socket."
  def route_source(ip) when is_binary(ip) do
    {:ok, tuple} = :inet.parse_address(String.to_charlist(ip))
    family = if tuple_size(tuple) == 4, do: :inet, else: :inet6
    {:ok, sock} = :gen_udp.open(0, [family, :binary])

    try do
      :ok = :gen_udp.connect(sock, tuple, 9)
      {:ok, {src, _port}} = :inet.sockname(sock)
      src |> :inet.ntoa() |> to_string()
    after
      :gen_udp.close(sock)
    end
  end

  @doc "Waits (bounded) until `fun` returns `{:ok, value}`; returns `value`."
  def eventually(fun, timeout_ms, what) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    do_eventually(fun, deadline, what)
  end

  defp do_eventually(fun, deadline, what) do
    case fun.() do
      {:ok, value} ->
        value

      other ->
        if System.monotonic_time(:millisecond) > deadline do
          raise ExUnit.AssertionError,
            message: "timed out waiting for #{what}; last result: #{inspect(other)}"
        else
          # A short pause between polls of kernel/native state; the overall wait is bounded.
          receive do
          after
            10 -> :ok
          end

          do_eventually(fun, deadline, what)
        end
    end
  end

  ## Extra IPv6 addresses on lo

  @doc """
  Adds `prefix<>N/128` to `lo` for each N (with `ip`, from iproute2). Returns
  `{usable_addresses, added_by_us, notes}`; an address that was already present is used but
  not removed later. Addresses that cannot be added or bound are left out, with a note.
  """
  def add_v6_addresses(prefix, ns) do
    case System.find_executable("ip") do
      nil ->
        {[], [], ["`ip` (iproute2) not found: cannot add IPv6 addresses to lo"]}

      ip ->
        Enum.reduce(ns, {[], [], []}, fn n, {usable, added, notes} ->
          addr = "#{prefix}#{n}"

          {out, rc} =
            System.cmd(ip, ["-6", "addr", "add", "#{addr}/128", "dev", "lo", "nodad"],
              stderr_to_stdout: true
            )

          cond do
            rc == 0 and bindable?(addr) ->
              {usable ++ [addr], added ++ [addr], notes}

            rc == 0 ->
              {usable, added ++ [addr], notes ++ ["#{addr} added but not bindable"]}

            out =~ "exists" and bindable?(addr) ->
              {usable ++ [addr], added, notes}

            true ->
              {usable, added, notes ++ ["ip addr add #{addr} failed: #{String.trim(out)}"]}
          end
        end)
    end
  end

  def remove_v6_addresses(addrs) do
    if ip = System.find_executable("ip") do
      for addr <- addrs do
        System.cmd(ip, ["-6", "addr", "del", "#{addr}/128", "dev", "lo"], stderr_to_stdout: true)
      end
    end

    :ok
  end

  defp bindable?(addr) do
    {:ok, tuple} = :inet.parse_address(String.to_charlist(addr))

    case :gen_udp.open(0, [:inet6, ip: tuple]) do
      {:ok, s} ->
        :gen_udp.close(s)
        true

      _ ->
        false
    end
  end

  ## UDP sockets held by this OS process

  @doc """
  The UDP sockets this OS process (the VM) holds: `/proc/self/fd` entries that are
  `socket:[inode]`, matched against the inodes in `/proc/net/udp` and `/proc/net/udp6`.
  Returns a list of `{local_address, inode}`.
  """
  def udp_sockets do
    inodes =
      for fd <- File.ls!("/proc/self/fd"),
          {:ok, "socket:[" <> rest} <- [File.read_link("/proc/self/fd/" <> fd)],
          into: MapSet.new(),
          do: String.trim_trailing(rest, "]")

    for file <- ["/proc/net/udp", "/proc/net/udp6"],
        {:ok, body} <- [File.read(file)],
        [_header | lines] = String.split(body, "\n", trim: true),
        line <- lines,
        fields = String.split(line),
        inode = Enum.at(fields, 9),
        MapSet.member?(inodes, inode),
        do: {Enum.at(fields, 1), inode}
  end

  def udp_socket_count, do: length(udp_sockets())

  @doc """
  Datagrams the kernel dropped (the `drops` column of `/proc/net/udp{,6}`) on this VM's UDP
  sockets bound to any of `ports`, summed.
  """
  def socket_drops(ports) do
    inodes =
      for fd <- File.ls!("/proc/self/fd"),
          {:ok, "socket:[" <> rest} <- [File.read_link("/proc/self/fd/" <> fd)],
          into: MapSet.new(),
          do: String.trim_trailing(rest, "]")

    hex_ports = MapSet.new(ports, &(&1 |> Integer.to_string(16) |> String.pad_leading(4, "0")))

    for file <- ["/proc/net/udp", "/proc/net/udp6"],
        {:ok, body} <- [File.read(file)],
        [_header | lines] = String.split(body, "\n", trim: true),
        line <- lines,
        fields = String.split(line),
        MapSet.member?(inodes, Enum.at(fields, 9)),
        [_ip, hex_port] = String.split(Enum.at(fields, 1), ":"),
        MapSet.member?(hex_ports, hex_port),
        reduce: 0,
        do: (acc -> acc + String.to_integer(List.last(fields)))
  end
end
