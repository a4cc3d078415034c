# `MACULA_QUIC_INLINE=0` runs every task on the runtime, for comparison (README, "How the
# work is scheduled"); the tests that assert work ran inside a call (`:inline_only`) are
# then left out.
exclude = if System.get_env("MACULA_QUIC_INLINE") == "0", do: [:inline_only], else: []
ExUnit.start(exclude: exclude)
