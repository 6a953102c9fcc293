"""Per-kernel summary of one replayed decode step from an ncu CSV.

The CSV comes from (GPU machine, repo root, binaries from scripts/gpu/bundle.sh):

    INDEXCACHE_PROFILE_DECODE=1 /usr/local/cuda/bin/ncu --profile-from-start off \\
        --graph-profiling node --cache-control none --clock-control none \\
        --metrics gpu__time_duration.sum --csv \\
        gpu-bundle/indexcache bench --device cuda --dtype bf16 --random-weights \\
        configs/glm-30b-dsa.json --contexts 4096 --patterns <pattern> --decode 4 > step.csv

More metrics may follow the time in `--metrics` (ncu writes one row per kernel and metric), e.g.
`gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,
sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct`: each gets a column
with its mean per launch, and `dram__bytes_read.sum` also the achieved read bandwidth (GB/s =
bytes / duration).

The last step starts at the last one-block `gather_rows` (the step's embedding lookup). Prints
kernel, grid, launches, total and mean µs (and the extra metrics), sorted by total; `--csv OUT`
also writes that table (the format of docs/gpu/*-decode-step-kernels*.csv, extra metrics as more
columns). The sum is of kernels measured one at a time (ncu serialises graph nodes): under
programmatic dependent launch the step itself is shorter.

Usage: python3 scripts/gpu/ncu_step.py step.csv [--csv OUT]
"""

import collections
import csv
import sys

TIME = "gpu__time_duration.sum"
# ncu's duration units, in µs.
TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
# ncu's byte units, in bytes.
BYTE_UNITS = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def number(s):
    return float(s.replace(",", ""))


def launches(path):
    """[(kernel, grid, {metric: (value, unit)})] in launch order."""
    rows = [r for r in csv.reader(open(path)) if len(r) > 10]
    if not rows:
        sys.exit(f"{path}: no ncu CSV rows")
    head, data = rows[0], rows[1:]
    col = {name: head.index(name) for name in ("ID", "Kernel Name", "Grid Size", "Metric Value")}
    name_i = head.index("Metric Name") if "Metric Name" in head else None
    unit_i = head.index("Metric Unit") if "Metric Unit" in head else None
    out = collections.OrderedDict()
    for r in data:
        key = r[col["ID"]]
        if key not in out:
            out[key] = (r[col["Kernel Name"]].split("(")[0], r[col["Grid Size"]], {})
        metric = r[name_i] if name_i is not None else TIME
        unit = r[unit_i] if unit_i is not None else "nsecond"
        out[key][2][metric] = (number(r[col["Metric Value"]]), unit)
    return list(out.values())


def main(argv):
    path = argv[0]
    out = argv[argv.index("--csv") + 1] if "--csv" in argv else None
    ks = launches(path)
    starts = [i for i, (name, grid, _) in enumerate(ks) if name.startswith("gather_rows") and grid == "(1, 1, 1)"]
    if not starts:
        sys.exit(f"{path}: no one-block gather_rows launch (was the decode step profiled?)")
    step = ks[starts[-1] :]
    extra = [m for m in step[0][2] if m != TIME]
    if any(TIME not in m for _, _, m in step):
        sys.exit(f"{path}: a kernel without {TIME} (add it to --metrics)")
    agg = collections.OrderedDict()
    for name, grid, m in step:
        a = agg.setdefault((name, grid), {"n": 0, "us": 0.0, **{e: 0.0 for e in extra}, "bytes": 0.0})
        value, unit = m[TIME]
        a["n"] += 1
        a["us"] += value * TIME_UNITS.get(unit, 1e-3)
        for e in extra:
            v, u = m.get(e, (0.0, ""))
            a[e] += v
            if e == "dram__bytes_read.sum":
                a["bytes"] += v * BYTE_UNITS.get(u, 1.0)
    table = sorted(agg.items(), key=lambda kv: -kv[1]["us"])
    total = sum(a["us"] for a in agg.values())
    gbps = "dram__bytes_read.sum" in extra
    head = ["kernel", "grid", "launches", "total_us", "mean_us"] + extra + (["read_GBps"] if gbps else [])

    def cells(name, grid, a):
        row = [name, grid, str(a["n"]), f"{a['us']:.1f}", f"{a['us'] / a['n']:.2f}"]
        row += [f"{a[e] / a['n']:.4g}" for e in extra]
        if gbps:
            row.append(f"{a['bytes'] / (a['us'] * 1e3):.0f}" if a["us"] > 0 else "-")
        return row

    print(f"{len(step)} kernels, {total:.1f} µs summed")
    if extra:
        print("  ".join(head))
    for (name, grid), a in table:
        c = cells(name, grid, a)
        print(f"{c[0]:44s} {c[1]:14s} {c[2]:>5s} {c[3]:>9s} {c[4]:>8s}  " + "  ".join(c[5:]))
    if out:
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(head)
            for (name, grid), a in table:
                w.writerow(cells(name, grid, a))


if __name__ == "__main__":
    main(sys.argv[1:])
