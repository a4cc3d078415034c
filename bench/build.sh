#!/usr/bin/env bash
# Builds what the benchmarks and the profiler run, and copies it into a private directory ($1),
# so that a rebuild elsewhere in the tree while they run cannot swap the library under them:
#   $1/macula_quic/{ebin,priv}   the app and its NIF (release build, MIX_ENV=bench)
#   $1/quinn_baseline            the raw-Quinn baseline (examples/quinn_baseline.rs)
# Used by bin/bench and bin/profile; progress goes to stderr.
set -euo pipefail
work=${1:?usage: bench/build.sh WORK_DIR}
cd "$(dirname "$0")/.."
say() { printf '[build] %s\n' "$*" >&2; }

bin/setup
export MIX_ENV=bench
say "building the NIF (cargo build --release, via mix compile)"
MACULA_QUIC_BUILD=1 mix compile >&2
say "building the raw-Quinn baseline (cargo build --release --example quinn_baseline)"
cargo build --release --example quinn_baseline --manifest-path native/macula_quic/Cargo.toml >&2

# A fresh copy: `cp -r` into a directory left by an earlier build would nest inside it.
rm -rf "$work/macula_quic"
mkdir -p "$work/macula_quic"
cp -r _build/bench/lib/macula_quic/ebin "$work/macula_quic/ebin"
cp -rL _build/bench/lib/macula_quic/priv "$work/macula_quic/priv"
cp native/macula_quic/target/release/examples/quinn_baseline "$work/quinn_baseline"
