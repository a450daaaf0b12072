#!/usr/bin/env python3
"""make bench (streams): bidirectional ping-pong streams, grpc-cm beside the C++ client and grpc-swift-2.

Every client opens --concurrency bidirectional streams on the C++ echo server's /echo.Echo/Stream and sends each
stream's next message when the echo of its last one arrives. Three scenarios: one stream of empty messages (messages
per CPU-second), 64 concurrent streams on one connection, one stream of 1 MiB messages (throughput and CPU per MiB,
counting the bytes both ways). Interleaved reps, medians; writes the "streams" section of Perf/RESULTS.md.

  Perf/bench_streams.py [--reps 3] [--duration 5] [--no-swift]
"""
import argparse, datetime, os, platform

import benchlib
from benchlib import med

SCENARIOS = [("one stream, 0 B messages", 1, 0), ("64 streams, 0 B messages", 64, 0),
             ("one stream, 1 MiB messages", 1, 1 << 20)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--no-swift", dest="swift", action="store_false")
    args = ap.parse_args()
    clients = benchlib.prepare(swift=args.swift)
    results = {}
    with benchlib.Server():
        for name, streams, payload in SCENARIOS:
            for rep in range(args.reps):
                for label in clients:
                    options = ["--stream-mode", "pingpong", "--connections", "1", "--concurrency", str(streams),
                               "--payload-bytes", str(payload), "--duration", str(args.duration), "--warmup", "1"]
                    out = benchlib.run(benchlib.client_cmd(label, options), timeout=args.duration * 4 + 60)
                    results.setdefault((name, label), []).append(out)
                    print(name, label, rep + 1, {k: out.get(k) for k in ("rps", "mib_per_s", "cpu_us_per_rpc", "errors", "error")},
                          flush=True)
    write(results, clients, args)


def write(results, clients, args):
    lines = ["## Streaming: bidirectional ping-pong", "",
             f"Written by `make bench` (`Perf/bench_streams.py --reps {args.reps} --duration {args.duration:g}`) on "
             f"{datetime.date.today().isoformat()}, {platform.platform()}, {os.cpu_count()} cores. The C++ echo server "
             "of `Perf/peers` (its `/echo.Echo/Stream` echoes each message of a bidirectional stream) pinned to CPU 0, "
             "each client pinned to CPU 1, interleaved, medians. Every client runs `--stream-mode pingpong "
             "--connections 1 --concurrency STREAMS --payload-bytes N` (grpc-cm: `grpc-cm-perf`, which sends the next "
             "message from the message callback on the loop; cpp: `grpc_bench --threads 1`; swift: grpc-swift-2's "
             "`SwiftPeer --threads 1`). A message is one round trip (a request and its echo); MiB count the payload "
             "both ways.", ""]
    for name, streams, payload in SCENARIOS:
        lines += [f"### {name}", "",
                  "| client | messages/s | messages per CPU-second | p50 µs | p99 µs | MiB/s | CPU ms per MiB | errors "
                  "| CPU ratio grpc-cm / client |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        ours = med(results.get((name, "grpc-cm"), []), "cpu_us_per_rpc")
        for label in clients:
            runs = results.get((name, label), [])
            cpu = med(runs, "cpu_us_per_rpc")
            per_cpu_s = f"{1e6 / cpu:,.0f}" if cpu else ""
            ratio = f"{ours / cpu:.2f}" if ours and cpu and label != "grpc-cm" else ""
            failed = [r["error"] for r in runs if "error" in r]
            errors = sum(r.get("errors", 0) or 0 for r in runs) + len(failed)
            lines.append(f"| {label} | {med(runs, 'rps')} | {per_cpu_s} | {med(runs, 'p50_us')} | {med(runs, 'p99_us')} "
                         f"| {med(runs, 'mib_per_s') if payload else ''} | {med(runs, 'cpu_ms_per_mib') if payload else ''} "
                         f"| {errors} | {ratio} |")
        lines.append("")
    benchlib.replace_section("streams", "\n".join(lines))


if __name__ == "__main__":
    main()
