# The echo benchmark's floor on its own: two BEAM processes echoing 64-byte datagrams over
# loopback with no QUIC and no encryption, through `:gen_udp` (a port, which idle schedulers
# poll themselves) and `:socket` (a NIF woken through `enif_select`, as a QUIC engine driven
# from the BEAM's I/O polling would be). bin/bench runs the same next to its 64-byte echo
# (`Bench.Udp` in lib/udp.ex says more); this runs it alone, e.g. under other VM flags:
#
#   elixir bench/udp_echo.exs                     # 3 s of each
#   UDP_ECHO_SECONDS=10 ERL_AFLAGS="+IOs false" elixir bench/udp_echo.exs
Code.require_file("lib/util.ex", __DIR__)
Code.require_file("lib/udp.ex", __DIR__)

seconds = String.to_integer(System.get_env("UDP_ECHO_SECONDS", "3"))

for {name, kind} <- [{"gen_udp", :gen_udp}, {"socket (enif_select)", :socket}] do
  r = Bench.Udp.echo(kind, 64, seconds)

  IO.puts(
    "#{name} 64 B echo: #{round(r.rt_s)} round trips/s, p50 #{Float.round(r.p50_us, 1)} µs, " <>
      "p99 #{Float.round(r.p99_us, 1)} µs (#{r.round_trips} round trips in #{seconds} s, " <>
      "OTP #{System.otp_release()}, #{System.schedulers_online()} schedulers)"
  )
end
