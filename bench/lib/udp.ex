defmodule Bench.Udp do
  @moduledoc false
  # The echo benchmark's floor: two BEAM processes echoing plain UDP datagrams over loopback,
  # with no QUIC and no encryption. It is what the BEAM's own socket I/O and process wake-ups
  # cost per round trip, so no QUIC engine that hands its data to BEAM processes can beat it
  # on the same machine; bin/bench runs it next to the 64-byte echo and reports macula_quic and
  # raw Quinn against it. Two ways in:
  #
  # - `:gen_udp`: OTP's inet driver (a port). A port's frequently read descriptors move into
  #   the pollset that idle schedulers poll themselves (erl_check_io.c: only port tasks take
  #   that path), so a datagram can wake the scheduler that runs the receiving process.
  # - `:socket`: OTP's `socket` module, a NIF told about readiness by `enif_select`, as a QUIC
  #   engine driven from the BEAM's I/O polling would be: the VM's poll thread wakes, then
  #   hands a message to the process's scheduler.

  @loopback {127, 0, 0, 1}

  @doc """
  `size`-byte echo round trips for `seconds` (after 1,000 warm-up ones) through `kind`
  (`:gen_udp` or `:socket`): `%{round_trips, seconds, rt_s, p50_us, p99_us}`.
  """
  def echo(kind, size, seconds) do
    {client, round_trip, stop} = start(kind)
    msg = :binary.copy(<<1>>, size)

    try do
      for _ <- 1..1000, do: round_trip.(client, msg)
      Bench.Util.time_round_trips(seconds, fn -> round_trip.(client, msg) end)
    after
      stop.()
    end
  end

  # The client socket, a function doing one round trip through an echoing process, and a
  # function that closes both sockets.
  defp start(:gen_udp) do
    {:ok, client} = :gen_udp.open(0, [:binary, active: true, ip: @loopback])
    {:ok, echo} = :gen_udp.open(0, [:binary, active: true, ip: @loopback])
    {:ok, port} = :inet.port(echo)
    server = spawn_link(fn -> gen_udp_echo(echo) end)
    :ok = :gen_udp.controlling_process(echo, server)

    round_trip = fn client, msg ->
      :ok = :gen_udp.send(client, @loopback, port, msg)

      receive do
        {:udp, ^client, _, _, _} -> :ok
      end
    end

    {client, round_trip, fn -> stop(server, fn -> :gen_udp.close(client) end) end}
  end

  defp start(:socket) do
    client = socket_open()
    echo = socket_open()
    {:ok, addr} = :socket.sockname(echo)
    server = spawn_link(fn -> socket_echo(echo) end)
    :ok = :socket.setopt(echo, {:otp, :controlling_process}, server)

    round_trip = fn client, msg ->
      :ok = :socket.sendto(client, msg, addr)
      _ = socket_recv(client)
      :ok
    end

    {client, round_trip, fn -> stop(server, fn -> :socket.close(client) end) end}
  end

  # The echoing process closes its own socket when it stops (it owns it).
  defp stop(server, close_client) do
    ref = Process.monitor(server)
    Process.unlink(server)
    Process.exit(server, :kill)
    receive(do: ({:DOWN, ^ref, _, _, _} -> :ok))
    close_client.()
  end

  defp gen_udp_echo(socket) do
    receive do
      {:udp, ^socket, ip, port, data} ->
        :ok = :gen_udp.send(socket, ip, port, data)
        gen_udp_echo(socket)
    end
  end

  defp socket_open do
    {:ok, s} = :socket.open(:inet, :dgram, :udp)
    :ok = :socket.bind(s, %{family: :inet, addr: @loopback, port: 0})
    s
  end

  # Reads one datagram; when none is waiting, the NIF selects the descriptor and the process
  # waits for the select message.
  defp socket_recv(s) do
    case :socket.recvfrom(s, 0, [], :nowait) do
      {:ok, {source, data}} ->
        {source, data}

      {:select, {:select_info, _, handle}} ->
        receive do
          {:"$socket", ^s, :select, ^handle} -> socket_recv(s)
        end
    end
  end

  defp socket_echo(s) do
    {source, data} = socket_recv(s)
    :ok = :socket.sendto(s, data, source)
    socket_echo(s)
  end
end
