# Placeholder main job until the API lands: proves the NIF loads.
:ok = MaculaQuic.Native.ping()
IO.puts("macula_quic NIF loaded")
