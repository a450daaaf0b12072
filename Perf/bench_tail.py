#!/usr/bin/env python3
"""make bench (tail): open-loop tail latency, grpc-cm beside the C++ client, with latency CDF plots.

First each client's peak: closed loop at (b) (1 connection, 64 unary calls in flight, 0 B). Then open-loop runs at
25 %, 50 % and 80 % of the lower of the two peaks, the same offered load for both clients: calls start on a fixed
schedule whatever has completed, and each call's latency counts from its scheduled start, so queueing is not hidden
(no coordinated omission). p50, p99 and p99.9 per run, and one PNG per load with each client's latency by percentile
(matplotlib from PyPI, in a venv of the rig) in Perf/plots/. Writes the "tail" section of Perf/RESULTS.md.

  Perf/bench_tail.py [--duration 10] [--peak-duration 5] [--fractions 0.25,0.5,0.8]
"""
import argparse, datetime, math, os, platform, subprocess

import benchlib
from benchlib import med

PLOTS = os.path.join(benchlib.ROOT, "Perf", "plots")
CLIENTS = ["grpc-cm", "cpp"]


def read_hgrm(path):
    """(latency µs, percentile 0..1) pairs of an HdrHistogram percentile distribution."""
    points = []
    for line in open(path):
        parts = line.split()
        if len(parts) != 4:
            continue
        try:
            value, percentile = float(parts[0]), float(parts[1])
        except ValueError:
            continue
        if percentile < 1.0:
            points.append((value, percentile))
    return points


def plot(fraction, rate, files, out):
    python = os.path.join(benchlib.RIG, ".venv-plot", "bin", "python")
    if not os.path.exists(python):
        benchlib.sh(f"python3 -m venv {benchlib.RIG}/.venv-plot && {python} -m pip install -q matplotlib")
    series = {label: read_hgrm(path) for label, path in files.items() if os.path.exists(path)}
    script = f"""
import math, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
series = {series!r}
fig, ax = plt.subplots(figsize=(7, 4.2))
for label, points in series.items():
    ax.plot([1 / (1 - p) for _, p in points], [v for v, _ in points], label=label, linewidth=1.6)
ax.set_xscale("log")
ax.set_yscale("log")
ticks = [2, 10, 100, 1000, 10000]
ax.set_xticks(ticks)
ax.set_xticklabels(["50%", "90%", "99%", "99.9%", "99.99%"])
ax.set_xlabel("percentile")
ax.set_ylabel("latency (µs, from the scheduled start)")
ax.set_title("Open loop at {fraction:.0%} of peak ({rate:,.0f} calls/s), 1 connection, 0 B")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig({out!r}, dpi=110)
"""
    subprocess.run([python, "-c", script], check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--peak-duration", type=float, default=5)
    ap.add_argument("--fractions", default="0.25,0.5,0.8")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    benchlib.prepare(swift=False)
    os.makedirs(PLOTS, exist_ok=True)
    peaks, runs = {}, {}
    with benchlib.Server():
        for label in CLIENTS:
            closed = [benchlib.run(benchlib.client_cmd(label, ["--connections", "1", "--concurrency", "64",
                                                                "--duration", str(args.peak_duration), "--warmup", "1"]),
                                   timeout=args.peak_duration * 4 + 60) for _ in range(3)]
            peaks[label] = med(closed, "rps")
            print("peak", label, peaks[label], flush=True)
    base = min(p for p in peaks.values() if p)
    if True:
        for fraction in [float(x) for x in args.fractions.split(",")]:
            rate = base * fraction
            files = {}
            candidates = {label: [] for label in CLIENTS}
            for rep in range(args.reps):
                for label in CLIENTS:  # interleaved: rep 1 of each client, then rep 2, ...
                    path = f"{benchlib.RIG}/logs/tail-{label}-{round(fraction * 100)}-{rep}.hgrm"
                    options = ["--connections", "1", "--rate", f"{rate:.0f}", "--duration", str(args.duration),
                               "--warmup", "1", "--hgrm", path]
                    # A fresh server for every open-loop run: one that an overloaded run left with a backlog would
                    # still be working through it during the next.
                    with benchlib.Server():
                        out = benchlib.run(benchlib.client_cmd(label, options), timeout=args.duration * 4 + 60)
                    candidates[label].append((out, path))
                    print(fraction, label, rep, {k: out.get(k) for k in ("rps", "offered", "unfinished", "p50_us",
                                                                         "p99_us", "p999_us", "errors", "first_error",
                                                                         "error")}, flush=True)
            for label in CLIENTS:
                # The median run, by (failed outright, unfinished calls, errors, p99): one run's figures together,
                # not a mix of runs' percentiles.
                ranked = sorted(candidates[label], key=lambda c: ("error" in c[0], c[0].get("unfinished") or 0,
                                                                  c[0].get("errors") or 0, c[0].get("p99_us") or 0))
                out, files[label] = ranked[len(ranked) // 2]
                runs[(fraction, label)] = {**out, "reps": len(ranked)}
            plot(fraction, rate, files, os.path.join(PLOTS, f"tail-{round(fraction * 100)}.png"))
    write(peaks, base, runs, args)


def write(peaks, base, runs, args):
    lines = ["## Tail latency, open loop", "",
             f"Written by `make bench` (`Perf/bench_tail.py --duration {args.duration:g} --peak-duration "
             f"{args.peak_duration:g} --reps {args.reps}`) on {datetime.date.today().isoformat()}, {platform.platform()}, "
             f"{os.cpu_count()} cores. The C++ echo server of `Perf/peers` pinned to CPU 0, the client to CPU 1. Peak: "
             "closed loop, 1 connection, 64 in flight, 0 B, median of 3 runs (" +
             ", ".join(f"{label} {peak:,.0f} calls/s" for label, peak in peaks.items() if peak) +
             f"). Each load is a fraction of the lower peak ({base:,.0f} calls/s), offered to both clients: "
             "`--connections 1 --rate R --duration D --warmup 1 --hgrm FILE` (grpc-cm: `grpc-cm-perf`, a pacer thread "
             "starting calls onto the loop; cpp: `grpc_bench --threads 1`), a fresh server for each run, each row the "
             "median of its runs (ranked by unfinished calls, then errors, then p99; the figures of one run). "
             "Both clients count "
             "the calls scheduled in the window, by their scheduled start, however late they end, and wait for them up "
             "to max(duration, 2 s) after it; those still unfinished then are counted as such (`finished` column), and "
             "a row where more than 1 % are is marked overloaded: its percentiles are of the calls that finished, so "
             "they understate. Open loop has no backpressure: a load the server cannot keep up with leaves every "
             "client with a queue that only grows (the single-threaded C++ echo server falls behind with thousands of "
             "streams open at once sooner than its closed-loop peak with 64 suggests).", "",
             "| load | calls/s offered | client | finished / offered | p50 µs | p99 µs | p99.9 µs | CPU µs/call | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fractions = sorted({f for f, _ in runs})
    for fraction in fractions:
        for label in CLIENTS:
            out = runs[(fraction, label)]
            errors = out.get("errors", "") if "error" not in out else out["error"].replace("|", "/")[:80]
            if out.get("first_error"):
                errors = f"{errors} (first: {out['first_error'][:70]})"
            offered, unfinished = out.get("offered"), out.get("unfinished")
            finished = f"{offered - unfinished:,} / {offered:,}" if offered is not None and unfinished is not None else ""
            if offered and unfinished is not None and unfinished > offered * 0.01:
                # The offered load outran the server: the queue only grew, and what finished is the early part.
                errors = f"{errors}; overloaded ({unfinished:,} unfinished)"
            if "error" not in out and not out.get("requests"):
                out = {**out, "p50_us": "", "p99_us": "", "p999_us": "", "cpu_us_per_rpc": ""}
            lines.append(f"| {fraction:.0%} | {base * fraction:,.0f} | {label} | {finished} | {out.get('p50_us')} | "
                         f"{out.get('p99_us')} | {out.get('p999_us')} | {out.get('cpu_us_per_rpc')} | {errors} |")
    lines.append("")
    for fraction in fractions:
        lines += [f"![latency by percentile at {fraction:.0%} of peak](plots/tail-{round(fraction * 100)}.png)", ""]
    benchlib.replace_section("tail", "\n".join(lines))


if __name__ == "__main__":
    main()
