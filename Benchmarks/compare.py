#!/usr/bin/env python3
"""Side-by-side wall-clock comparison of whole commands, alternating runs.

usage: compare.py --runs N [--warmup W] --cmd LABEL 'SHELL COMMAND' --cmd LABEL 'SHELL COMMAND' ...

Runs each command once per round, in alternating order, for N rounds (after W warm-up
rounds), so that machine noise hits every command alike. Prints per-command median,
10th/90th percentile and min in milliseconds, and each command's median as a ratio of
the first command's. A command that exits non-zero is reported and counted as failed.
"""
import argparse, statistics, subprocess, sys, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cmd", nargs=2, action="append", metavar=("LABEL", "COMMAND"), required=True)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    times = {label: [] for label, _ in a.cmd}
    failures = {label: 0 for label, _ in a.cmd}
    for r in range(a.warmup + a.runs):
        order = a.cmd if r % 2 == 0 else list(reversed(a.cmd))
        for label, cmd in order:
            t = time.monotonic()
            p = subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=a.timeout)
            dt = (time.monotonic() - t) * 1000
            if p.returncode != 0:
                failures[label] += 1
                sys.stderr.write(f"{label}: exit {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}\n")
                continue
            if r >= a.warmup:
                times[label].append(dt)
    base = None
    print(f"{'command':<28} {'runs':>4} {'median ms':>10} {'p10':>8} {'p90':>8} {'min':>8} {'ratio':>7}")
    for label, _ in a.cmd:
        t = sorted(times[label])
        if not t:
            print(f"{label:<28} {0:>4} {'failed':>10}")
            continue
        med = statistics.median(t)
        p10 = t[max(0, int(len(t) * 0.1) - 0)] if len(t) > 1 else t[0]
        p90 = t[min(len(t) - 1, int(len(t) * 0.9))]
        if base is None:
            base = med
        print(f"{label:<28} {len(t):>4} {med:>10.1f} {p10:>8.1f} {p90:>8.1f} {t[0]:>8.1f} {med / base:>7.2f}")
    if any(failures.values()):
        print("failures:", failures)
        sys.exit(1)

main()
