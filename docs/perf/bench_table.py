#!/usr/bin/env python3
"""Renders bench_cpu JSON (--benchmark_format=json or --benchmark_out) as the markdown tables of
docs/PERFORMANCE.md: op, shape, storage, time, GB/s, the copy bandwidth timed after the benchmark (its
roofline; absent from runs before 2026-11-24 11:30 UTC, which used the copy timed at the start), roofline
fraction.
Usage: bench_table.py <bench.json> [name regex]"""
import json
import re
import sys


def main():
    data = json.load(open(sys.argv[1]))
    pattern = re.compile(sys.argv[2] if len(sys.argv) > 2 else ".")
    ctx = data["context"]
    print(f"copy at the start {float(ctx['copy_GBps']):.1f} GB/s, Eigen fp32 GEMM {float(ctx['gemm_GFLOPs']):.1f} GFLOP/s, "
          f"{ctx['threads']} threads, {ctx['date']}\n")
    print("| benchmark | op | shape | storage | time | GB/s | copy GB/s | roofline fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for b in data["benchmarks"]:
        name = b["name"].replace("/real_time", "")
        if not pattern.search(name):
            continue
        parts = name.split("/")
        op, storage = parts[0], parts[1]
        shape = " ".join(p for p in parts[2:5])
        if len(parts) > 5:
            op += f" ({parts[5]})"
        t = b["real_time"] * {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b["time_unit"]]
        time = f"{t / 1e3:.2f} ms" if t >= 1000 else f"{t:.1f} us"
        print(f"| `{name}` | {op} | {shape} | {storage} | {time} | {b['bytes_per_second'] / 1e9:.1f} | "
              f"{b['copy_GBps']:.1f} | {b['roofline_fraction']:.2f} |")


if __name__ == "__main__":
    main()
