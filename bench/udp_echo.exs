# A reference point for the echo benchmark: two BEAM processes echoing 64-byte datagrams over
# loopback with plain :gen_udp (no QUIC, no encryption). It shows what the BEAM's own socket
# I/O and process wake-ups cost per round trip, i.e. the floor for a QUIC engine driven on the
# BEAM's scheduler threads (README, "Where the targets are missed, and why").
#
#   elixir bench/udp_echo.exs            # 30,000 round trips after 1,000 warm-up ones
#   UDP_ECHO_ROUND_TRIPS=100000 elixir bench/udp_echo.exs
defmodule Bench.UdpEcho do
  @loopback {127, 0, 0, 1}

  def main do
    n = String.to_integer(System.get_env("UDP_ECHO_ROUND_TRIPS", "30000"))
    {:ok, client} = :gen_udp.open(0, [:binary, active: true, ip: @loopback])
    {:ok, echo} = :gen_udp.open(0, [:binary, active: true, ip: @loopback])
    {:ok, echo_port} = :inet.port(echo)
    server = spawn_link(fn -> echo_loop(echo) end)
    :ok = :gen_udp.controlling_process(echo, server)
    msg = :binary.copy(<<1>>, 64)

    for _ <- 1..1000, do: round_trip(client, echo_port, msg)
    t0 = System.monotonic_time(:microsecond)

    lat =
      for _ <- 1..n do
        t = System.monotonic_time(:nanosecond)
        round_trip(client, echo_port, msg)
        System.monotonic_time(:nanosecond) - t
      end

    us = System.monotonic_time(:microsecond) - t0
    sorted = lat |> Enum.sort() |> List.to_tuple()
    pct = fn p -> elem(sorted, min(n - 1, round(p / 100 * (n - 1)))) / 1000 end

    IO.puts(
      "gen_udp 64 B echo: #{round(n / (us / 1.0e6))} round trips/s, " <>
        "p50 #{Float.round(pct.(50), 1)} µs, p99 #{Float.round(pct.(99), 1)} µs " <>
        "(#{n} round trips, OTP #{System.otp_release()}, #{System.schedulers_online()} schedulers)"
    )
  end

  defp round_trip(client, port, msg) do
    :ok = :gen_udp.send(client, @loopback, port, msg)

    receive do
      {:udp, ^client, _, _, _} -> :ok
    end
  end

  defp echo_loop(socket) do
    receive do
      {:udp, ^socket, ip, port, data} ->
        :ok = :gen_udp.send(socket, ip, port, data)
        echo_loop(socket)
    end
  end
end

Bench.UdpEcho.main()
