# A reference point for the echo benchmark: two BEAM processes echoing 64-byte datagrams over
# loopback with no QUIC and no encryption, twice:
#
# - gen_udp: OTP's inet driver (a port). A port's frequently read descriptors move into the
#   pollset that idle schedulers poll themselves, so a datagram can wake the scheduler that
#   will run the receiving process directly.
# - socket: OTP's `socket` module, a NIF that is told about readiness by `enif_select`, as a
#   QUIC engine driven from the BEAM's I/O polling would be. The VM's poll thread wakes, then
#   hands a message to the process's scheduler.
#
# It shows what the BEAM's own socket I/O and process wake-ups cost per round trip, i.e. the
# floor for a QUIC engine driven on the BEAM's threads (bench/README.md, "Where the targets are
# missed: the measurements").
#
#   elixir bench/udp_echo.exs            # 30,000 round trips of each after 1,000 warm-up ones
#   UDP_ECHO_ROUND_TRIPS=100000 elixir bench/udp_echo.exs
defmodule Bench.UdpEcho do
  @loopback {127, 0, 0, 1}

  def main do
    n = String.to_integer(System.get_env("UDP_ECHO_ROUND_TRIPS", "30000"))
    msg = :binary.copy(<<1>>, 64)

    for {name, kind} <- [
          {"gen_udp", Bench.UdpEcho.GenUdp},
          {"socket (enif_select)", Bench.UdpEcho.Socket}
        ] do
      {client, round_trip} = kind.start(@loopback)
      for _ <- 1..1000, do: round_trip.(client, msg)
      report(name, n, measure(n, fn -> round_trip.(client, msg) end))
    end
  end

  # Round trips per second and the sorted latencies (ns) of `n` calls to `fun`.
  defp measure(n, fun) do
    t0 = System.monotonic_time(:microsecond)

    lat =
      for _ <- 1..n do
        t = System.monotonic_time(:nanosecond)
        fun.()
        System.monotonic_time(:nanosecond) - t
      end

    us = System.monotonic_time(:microsecond) - t0
    {n / (us / 1.0e6), lat |> Enum.sort() |> List.to_tuple()}
  end

  defp report(name, n, {rate, sorted}) do
    pct = fn p -> Float.round(elem(sorted, min(n - 1, round(p / 100 * (n - 1)))) / 1000, 1) end

    IO.puts(
      "#{name} 64 B echo: #{round(rate)} round trips/s, p50 #{pct.(50)} µs, p99 #{pct.(99)} µs " <>
        "(#{n} round trips, OTP #{System.otp_release()}, #{System.schedulers_online()} schedulers)"
    )
  end
end

defmodule Bench.UdpEcho.GenUdp do
  @moduledoc false

  # Returns the client socket and a function doing one round trip through an echoing process.
  def start(ip) do
    {:ok, client} = :gen_udp.open(0, [:binary, active: true, ip: ip])
    {:ok, echo} = :gen_udp.open(0, [:binary, active: true, ip: ip])
    {:ok, port} = :inet.port(echo)
    server = spawn_link(fn -> echo_loop(echo) end)
    :ok = :gen_udp.controlling_process(echo, server)

    round_trip = fn client, msg ->
      :ok = :gen_udp.send(client, ip, port, msg)

      receive do
        {:udp, ^client, _, _, _} -> :ok
      end
    end

    {client, round_trip}
  end

  defp echo_loop(socket) do
    receive do
      {:udp, ^socket, ip, port, data} ->
        :ok = :gen_udp.send(socket, ip, port, data)
        echo_loop(socket)
    end
  end
end

defmodule Bench.UdpEcho.Socket do
  @moduledoc false

  def start(ip) do
    client = open(ip)
    echo = open(ip)
    {:ok, addr} = :socket.sockname(echo)
    server = spawn_link(fn -> echo_loop(echo) end)
    :ok = :socket.setopt(echo, {:otp, :controlling_process}, server)

    round_trip = fn client, msg ->
      :ok = :socket.sendto(client, msg, addr)
      _ = recv(client)
      :ok
    end

    {client, round_trip}
  end

  defp open(ip) do
    {:ok, s} = :socket.open(:inet, :dgram, :udp)
    :ok = :socket.bind(s, %{family: :inet, addr: ip, port: 0})
    s
  end

  # Reads one datagram; when none is waiting, the NIF selects the descriptor and the process
  # waits for the select message.
  defp recv(s) do
    case :socket.recvfrom(s, 0, [], :nowait) do
      {:ok, {source, data}} ->
        {source, data}

      {:select, {:select_info, _, handle}} ->
        receive do
          {:"$socket", ^s, :select, ^handle} -> recv(s)
        end
    end
  end

  defp echo_loop(s) do
    {source, data} = recv(s)
    :ok = :socket.sendto(s, data, source)
    echo_loop(s)
  end
end

Bench.UdpEcho.main()
