#!/usr/bin/env bash
# Builds macula_quic as it was at a commit, for comparing builds with bin/rounds:
#
#   bench/build_rev.sh 7fe5a38 /tmp/old          # -> /tmp/old/macula_quic/{ebin,priv}
#   bin/rounds bulk quinn old:ebin=/tmp/old default
#
# The commit is checked out in a temporary git worktree (the working tree here is not touched),
# compiled as bench/build.sh compiles the current one (MIX_ENV=bench, the NIF built from source),
# and its app and NIF copied into $2/macula_quic; the worktree is removed afterwards, also after
# a failure. The worktree's cargo target directory starts as a copy of this tree's, so only what
# changed is rebuilt. The benchmark harness (bench/one.exs, bench/lib) and the raw-Quinn
# baseline stay this tree's: only the library differs between variants. Progress goes to stderr.
set -euo pipefail
rev=${1:?usage: bench/build_rev.sh COMMIT WORK_DIR}
work=${2:?usage: bench/build_rev.sh COMMIT WORK_DIR}
cd "$(dirname "$0")/.."
root=$PWD
say() { printf '[build_rev] %s\n' "$*" >&2; }

sha=$(git rev-parse --verify --quiet "$rev^{commit}") || { say "not a commit: $rev"; exit 2; }
tree=$(mktemp -d "${TMPDIR:-/tmp}/macula_quic_rev.XXXXXX")
cleanup() {
  git -C "$root" worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"
  git -C "$root" worktree prune >/dev/null 2>&1 || true
}
trap cleanup EXIT

say "checking out ${sha:0:12} in $tree"
git worktree add --detach --quiet "$tree" "$sha"
if [ -d native/macula_quic/target ]; then
  say "seeding its cargo target directory from this tree's"
  cp -r native/macula_quic/target "$tree/native/macula_quic/target"
fi

say "building the NIF (cargo build --release, via mix compile)"
(cd "$tree" && MIX_ENV=bench MACULA_QUIC_BUILD=1 mix compile >&2)

rm -rf "$work/macula_quic"
mkdir -p "$work/macula_quic"
cp -r "$tree/_build/bench/lib/macula_quic/ebin" "$work/macula_quic/ebin"
cp -rL "$tree/_build/bench/lib/macula_quic/priv" "$work/macula_quic/priv"
# bin/rounds names the variant by this commit.
echo "$sha" >"$work/macula_quic/REVISION"
say "built ${sha:0:12} into $work/macula_quic"
