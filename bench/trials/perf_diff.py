#!/usr/bin/env python3
"""Trial tool (2026-11-29): CPU per unit of work, symbol by symbol, for two `perf record -a`
runs of equal length taken during steady transfers (say, macula_quic's and raw Quinn's bulk),
with the rate each ran at. Symbols of our NIF and of the raw-Quinn binary are pooled as "RUST"
so that Quinn's and ring's functions line up. Prints the totals per DSO and the symbols that
differ most. bench/README.md, "Bulk: where the rest goes", has a run.

  perf record -a -F 4999 -o A.data -- sleep 2      # during each transfer
  perf report -i A.data --no-children --sort dso,sym -g none \\
    | grep -v '^#' | grep -v '^$' | awk '{p=$1; $1=""; print p "\\t" $0}' > A.txt
  bench/trials/perf_diff.py A.txt RATE_A B.txt RATE_B [SECONDS [CPUS [ROWS]]]

RATE is the unit of work per second (MiB/s); SECONDS (2) and CPUS (2) give the CPU time the
samples cover; the figures are µs of CPU per unit.
"""
import collections
import sys


def load(path):
    d = collections.defaultdict(float)
    for line in open(path):
        pct, rest = line.split("\t", 1)
        dso, sym = rest.strip().split(None, 1)
        if dso in ("libmacula_quic.so", "quinn_baseline"):
            dso = "RUST"
        d[(dso, sym)] += float(pct.rstrip("%"))
    return d


def main(argv):
    if len(argv) < 4:
        sys.exit(__doc__)
    a, ra, b, rb = argv[0], float(argv[1]), argv[2], float(argv[3])
    secs = float(argv[4]) if len(argv) > 4 else 2.0
    cpus = float(argv[5]) if len(argv) > 5 else 2.0
    n = int(argv[6]) if len(argv) > 6 else 30
    total_us = secs * cpus * 1e6
    da, db = load(a), load(b)
    rows = []
    for key in set(da) | set(db):
        x = da.get(key, 0) * total_us / 100 / (ra * secs)
        y = db.get(key, 0) * total_us / 100 / (rb * secs)
        rows.append((x - y, key, x, y))
    rows.sort(reverse=True)
    print("total: %s %.0f, %s %.0f" % (a, sum(r[2] for r in rows), b, sum(r[3] for r in rows)))
    by_dso = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        by_dso[r[1][0]][0] += r[2]
        by_dso[r[1][0]][1] += r[3]
    for dso, (x, y) in sorted(by_dso.items(), key=lambda kv: kv[1][1] - kv[1][0]):
        if abs(x - y) > 3:
            print("%-30s %8.1f %8.1f %+8.1f" % (dso[:30], x, y, x - y))
    print()
    for r in rows[:n] + [None] + rows[-n // 2:]:
        if r is None:
            print("...")
        else:
            print("%+8.1f %8.1f %8.1f %s %s" % (r[0], r[2], r[3], r[1][0][:12], r[1][1][:100]))


if __name__ == "__main__":
    main(sys.argv[1:])
