"""Per-kernel summary of one replayed decode step from an ncu CSV.

The CSV comes from (GPU machine, repo root, binaries from scripts/gpu/bundle.sh):

    INDEXCACHE_PROFILE_DECODE=1 /usr/local/cuda/bin/ncu --profile-from-start off \\
        --graph-profiling node --cache-control none --clock-control none \\
        --metrics gpu__time_duration.sum --csv \\
        gpu-bundle/indexcache bench --device cuda --dtype bf16 --random-weights \\
        configs/glm-30b-dsa.json --contexts 4096 --patterns <pattern> --decode 4 > step.csv

The last step starts at the last one-block `gather_rows` (the step's embedding lookup). Prints
kernel, grid, launches, total and mean µs, sorted by total; `--csv OUT` also writes that table
(the format of docs/gpu/*-decode-step-kernels*.csv). The sum is of kernels measured one at a time
(ncu serialises graph nodes): under programmatic dependent launch the step itself is shorter.

Usage: python3 scripts/gpu/ncu_step.py step.csv [--csv OUT]
"""

import collections
import csv
import sys


def main(argv):
    path = argv[0]
    out = argv[argv.index("--csv") + 1] if "--csv" in argv else None
    rows = [r for r in csv.reader(open(path)) if len(r) > 10]
    head, data = rows[0], rows[1:]
    ki, vi, gi = head.index("Kernel Name"), head.index("Metric Value"), head.index("Grid Size")
    starts = [i for i, r in enumerate(data) if r[ki].startswith("gather_rows") and r[gi] == "(1, 1, 1)"]
    if not starts:
        sys.exit(f"{path}: no one-block gather_rows launch (was the decode step profiled?)")
    agg = collections.OrderedDict()
    for r in data[starts[-1]:]:
        a = agg.setdefault((r[ki].split("(")[0], r[gi]), [0, 0.0])
        a[0] += 1
        a[1] += float(r[vi].replace(",", "")) / 1000.0  # ns -> µs
    table = sorted(agg.items(), key=lambda kv: -kv[1][1])
    total = sum(a[1] for a in agg.values())
    print(f"{len(data) - starts[-1]} kernels, {total:.1f} µs summed")
    for (name, grid), (n, us) in table:
        print(f"{name:44s} {grid:14s} {n:5d} {us:9.1f} {us / n:8.2f}")
    if out:
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kernel", "grid", "launches", "total_us", "mean_us"])
            for (name, grid), (n, us) in table:
                w.writerow([name, grid, n, f"{us:.1f}", f"{us / n:.2f}"])


if __name__ == "__main__":
    main(sys.argv[1:])
