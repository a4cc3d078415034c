#!/usr/bin/env bash
# Installs the interpreter ("emu") flavour of the installed OTP's emulator beside its JIT, so
# that `erl -emu_flavor emu` runs under valgrind (OTP 25's JIT does not: the VM dies in its
# garbage collector). Debian ships only the JIT, so this builds the same OTP version from
# Debian's source package: `./configure --disable-jit` and the emulator alone (about 2 minutes
# on 2 cores), then copies it to ERTS/bin/beam.emu, which is where erlexec looks for that
# flavour. The JIT stays the default. Needs root (apt-get source, and the copy into
# /usr/lib/erlang); does nothing when beam.emu is there already. Used by bin/instructions.
set -euo pipefail
say() { printf '[build_emu] %s\n' "$*" >&2; }

erts_bin=$(erl -noshell -eval 'io:format("~s/erts-~s/bin", [code:root_dir(), erlang:system_info(version)]), halt().')
if [ -x "$erts_bin/beam.emu" ]; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { say "needs root to build and install $erts_bin/beam.emu"; exit 1; }

version=$(dpkg-query -W -f='${Version}' erlang-base)
say "building the interpreter flavour of OTP $version (erlang-base) from Debian's source package"
command -v dpkg-source >/dev/null || apt-get install -y -qq dpkg-dev >/dev/null

# Debian's images list binary packages only; add the matching source lists if none are there.
if ! grep -rqs '^Types:.*deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/macula-quic-deb-src.sources
  else
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/macula-quic-deb-src.list
  fi
  apt-get update -qq
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/macula_quic_otp.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source --download-only "erlang=$version" >/dev/null 2>&1
dpkg-source -x --no-check erlang_*.dsc otp >/dev/null
cd otp
say "configure (--disable-jit)"
./configure --disable-jit --without-termcap --without-wx --without-javac --without-odbc --without-ssl >configure.log 2>&1
say "make emulator"
# The tools built after the emulator (erl_call and such) need libraries not built here, so
# make stops there; what matters is that the emulator was built.
make -j"$(nproc)" emulator >make.log 2>&1 || true
beam=$(ls bin/*/beam.smp 2>/dev/null | head -1)
[ -n "$beam" ] || { tail -20 make.log >&2; say "the emulator was not built"; exit 1; }
cp "$beam" "$erts_bin/beam.emu"
say "installed $erts_bin/beam.emu"
