#!/usr/bin/env python3
"""make bench (unary): grpc-cm-perf against the peer clients of Perf/peers, interleaved, medians of N reps.

Copies Perf/peers to a writable folder, builds the C++ server and client (and the Python venv; h2load when
Debian's nghttp2-client is installable; the grpc-swift-2 peer unless --no-swift: its first build takes 10-20 minutes), starts
the C++ echo server pinned to CPU 0, runs every client pinned to CPU 1, rep 1 of every client, then rep 2, and
writes the "matrix" section of Perf/RESULTS.md with the medians, the commands, the machine and the date.

  Perf/bench.py [--reps 3] [--duration 10] [--no-swift] [--no-instr] [--scenarios a,b,c] [--idle N,M]
"""
import argparse, datetime, json, os, platform, shutil, subprocess, sys, time

import benchlib
from benchlib import ROOT, RIG, PERF, med, run, sh

SCENARIOS = [("a", 1, 1, 0), ("a", 1, 1, 1024), ("b", 1, 64, 0), ("b", 1, 64, 1024), ("c", 4, 256, 0)]


def client_cmd(label, conns, conc, payload, duration):
    options = ["--payload-bytes", str(payload), "--connections", str(conns), "--concurrency", str(conc),
               "--duration", str(duration)]
    # h2load has no warm-up option.
    return benchlib.client_cmd(label, options + ([] if label == "h2load" else ["--warmup", "1"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--no-swift", dest="swift", action="store_false",
                    help="leave out the grpc-swift-2 peer (its first release build takes 10-20 minutes)")
    ap.add_argument("--idle", default="1000,10000")
    ap.add_argument("--no-instr", action="store_true", help="skip the callgrind instruction counts")
    ap.add_argument("--scenarios", default="a,b,c", help="which scenarios to run (default all: a,b,c)")
    args = ap.parse_args()

    clients = benchlib.prepare(swift=args.swift, python=True)
    if shutil.which("h2load") or subprocess.run("apt-get install -y -qq nghttp2-client >/dev/null 2>&1", shell=True).returncode == 0:
        clients.insert(2, "h2load")
    rig, perf = RIG, PERF
    server = subprocess.run([f"{rig}/start-server.sh", "50051"], capture_output=True, text=True).stdout.strip()
    results = {}
    try:
        time.sleep(0.5)
        for scenario, conns, conc, payload in [x for x in SCENARIOS if x[0] in args.scenarios.split(",")]:
            for rep in range(args.reps):
                for label in clients:
                    cmd = client_cmd(label, conns, conc, payload, args.duration)
                    out = run(cmd, timeout=args.duration * 4 + 30)
                    results.setdefault((scenario, payload, label), []).append(out)
                    print(scenario, payload, label, rep + 1, {k: out.get(k) for k in ("rps", "p50_us", "p99_us", "cpu_us_per_rpc", "errors", "error")}, flush=True)
        idle = {}
        for n in [int(x) for x in args.idle.split(",") if x]:
            idle_args = ["--target", "127.0.0.1:50051", "--idle-connections", str(n), "--idle-hold", "2"]
            idle_cmds = {"grpc-cm": [perf], "cpp": [f"{rig}/build/grpc_bench"],
                         "python": [f"{rig}/.venv/bin/python", f"{rig}/python/grpc_bench.py"],
                         "swift": [f"{rig}/swift-peer/.build/release/SwiftPeer"]}
            for label in [c for c in clients if c in idle_cmds]:
                idle[(n, label)] = run(idle_cmds[label] + idle_args, 600)
                print("idle", n, label, idle[(n, label)], flush=True)
    finally:
        subprocess.run(["kill", server])
    bus = subprocess.run(f"cd {ROOT} && swift build -c release --product bus-bench >/dev/null && .build/release/bus-bench 2000000",
                         shell=True, capture_output=True, text=True).stdout
    instr = [] if args.no_instr or not shutil.which("valgrind") else instructions(rig, perf)
    write(results, idle, bus, clients, args, instr)


def instructions(rig, perf):
    """User-space instructions per call at (b) 0 B under callgrind (load-independent): grpc-cm from two runs of
    different lengths without warm-up (start-up cancels out), the peers through their own instr.py."""
    rows = []
    # valgrind 3.19 cannot read the DWARF 5 that Swift emits: run a copy without debug info.
    bare = os.path.join(rig, "build", "grpc-cm-perf-nodebug")
    sh(["objcopy", "--strip-debug", perf, bare])
    server = subprocess.run([f"{rig}/start-server.sh", "50051"], capture_output=True, text=True).stdout.strip()
    try:
        time.sleep(0.5)
        points = []
        # A fixed number of calls, as the peers' instr.py runs them: timed runs left the calls that completed after
        # the window, and those drained at the end, executed but not counted.
        for calls in (3000, 13000):
            out_file = os.path.join(rig, "logs", f"grpc-cm-{calls}.callgrind")
            r = subprocess.run(["taskset", "-c", "1", "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
                                bare, "--target", "127.0.0.1:50051", "--connections", "1", "--concurrency", "64",
                                "--requests", str(calls), "--no-percentiles"],
                               capture_output=True, text=True, timeout=900)
            requests = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])["requests"]
            if requests != calls:
                raise SystemExit(f"grpc-cm-perf made {requests} calls of {calls} under callgrind")
            collected = int(r.stderr.split("Collected :")[-1].split()[0])
            points.append((requests, collected))
        (n1, i1), (n2, i2) = points
        rows.append(("grpc-cm", round((i2 - i1) / (n2 - n1))))
    finally:
        subprocess.run(["kill", server])
    r = subprocess.run([sys.executable, f"{rig}/instr.py", "--clients", "cpp,h2load", "--concurrency", "64",
                        "--small", "3000", "--large", "13000"], capture_output=True, text=True, timeout=1800)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            out = json.loads(line)
            rows.append((out["label"], out.get("instructions_per_rpc")))
    return rows


def write(results, idle, bus, clients, args, instr):
    lines = ["## The unary matrix", "",
             f"Written by `make bench` (`Perf/bench.py --reps {args.reps} --duration {args.duration:g}`) on "
             f"{datetime.date.today().isoformat()}, {platform.platform()}, {os.cpu_count()} cores. The C++ gRPC echo "
             "server of Perf/peers runs pinned to CPU 0 and every client pinned to CPU 1, interleaved (rep 1 of every "
             "client, then rep 2, ...). Medians of the reps. grpc-cm runs with its defaults (retry and circuit breaker on).",
             "", "Client commands (`--target 127.0.0.1:50051 --connections C --concurrency K --payload-bytes N "
             f"--duration {args.duration:g}` plus): grpc-cm `Perf/harness/.build/release/grpc-cm-perf --warmup 1`; cpp "
             "`build/grpc_bench --threads 1 --warmup 1`; python `python/grpc_bench.py --warmup 1`; h2load "
             "`h2load/h2load_bench.py`; swift `SwiftPeer --threads 1 --warmup 1`.", ""]
    for scenario, conns, conc, payload in [x for x in SCENARIOS if x[0] in args.scenarios.split(",")]:
        lines += [f"### ({scenario}) {conns} connection(s), {conc} in flight, {payload} B", "",
                  "| client | rps | p50 µs | p99 µs | CPU µs/call | allocations/call | errors | CPU ratio grpc-cm / client |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ours = med(results.get((scenario, payload, "grpc-cm"), []), "cpu_us_per_rpc")
        for label in clients:
            runs = results.get((scenario, payload, label), [])
            cpu = med(runs, "cpu_us_per_rpc")
            ratio = f"{ours / cpu:.2f}" if ours and cpu and label != "grpc-cm" else ""
            allocations = med(runs, "allocations_per_rpc")
            # A rep that failed outright is no median's: it is counted here, not left out without a word.
            failed = sum(1 for r in runs if "error" in r)
            errors = f"{sum(r.get('errors', 0) or 0 for r in runs)}" + (f" ({failed} of {len(runs)} runs failed)" if failed else "")
            lines.append(f"| {label} | {med(runs, 'rps')} | {med(runs, 'p50_us')} | {med(runs, 'p99_us')} | {cpu} | "
                         f"{allocations if allocations is not None else ''} | {errors} | {ratio} |")
        lines.append("")
    lines += ["### (d) idle connections (`--idle-connections N --idle-hold 2`)", "",
              "| N | client | KiB per connection | RSS KiB | open fds |", "| --- | --- | --- | --- | --- |"]
    for (n, label), out in sorted(idle.items()):
        per = out.get("rss_kb_per_connection", out.get("rss_per_conn_kb"))
        lines.append(f"| {n} | {label} | {per} | {out.get('rss_kb')} | {out.get('open_fds')} |")
    # Each client's figure above divides everything it grew by N, its one-time start-up (library, loop thread's
    # arena, caches) included; the slope between two N is what one more connection costs.
    counts = sorted({n for n, _ in idle})
    if len(counts) >= 2:
        low, high = counts[0], counts[-1]
        lines += ["", f"What one more idle connection costs, the slope from {low:,} to {high:,} "
                  f"((RSS at {high:,} - RSS at {low:,}) / {high - low:,}):", "",
                  "| client | KiB per connection |", "| --- | --- |"]
        for label in sorted({label for _, label in idle}):
            a, b = idle.get((low, label), {}), idle.get((high, label), {})
            if a.get("rss_kb") and b.get("rss_kb"):
                lines.append(f"| {label} | {(b['rss_kb'] - a['rss_kb']) / (high - low):.2f} |")
    lines += ["", "### (e) hot path", "", "Event bus (`bus-bench 2000000`):", "", bus.strip(), "",
              "Heap allocations per unary call: the `allocations/call` column above (grpc-cm only: the harness links "
              "CMallocCounter, which interposes malloc and counts every allocation of the client process during the "
              "measured window, divided by the calls).", ""]
    if instr:
        ours = dict(instr).get("grpc-cm")
        lines += ["User-space instructions per call at (b) 0 B (1 connection, 64 in flight) under callgrind, which counts "
                  "the same whatever else the machine does: grpc-cm from two runs of 3,000 and 13,000 calls "
                  "(`--requests`; difference of instructions over difference of calls), the peers from `instr.py "
                  "--concurrency 64 --small 3000 --large 13000`. Kernel work is not counted.", "",
                  "| client | instructions per call | grpc-cm / client |", "| --- | --- | --- |"]
        for label, count in instr:
            ratio = f"{ours / count:.2f}" if ours and count and label != "grpc-cm" else ""
            lines.append(f"| {label} | {count} | {ratio} |")
        lines.append("")
    benchlib.replace_section("matrix", "\n".join(lines))


if __name__ == "__main__":
    main()
