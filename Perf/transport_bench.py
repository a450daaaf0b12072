#!/usr/bin/env python3
"""The same generated grpc-swift-2 client over ManagedClientTransport ("cm") and grpc-swift-nio-transport ("nio"),
against one embedded echo server, interleaved (cm nio cm nio ...), medians of --reps runs.
Server pinned to CPU 0 and clients to CPU 1 when there are two. Writes Perf/RESULTS-transport.md.

    python3 Perf/transport_bench.py [--reps 3] [--duration 5] [--no-build]
"""
import argparse, datetime, json, os, platform, shutil, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(HERE, "transport-bench")


def pinned(cpu, argv):
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() >= 2:
        return ["taskset", "-c", str(cpu)] + argv
    return argv


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()

    if not args.no_build:
        subprocess.run(["swift", "build", "-c", "release"], cwd=PACKAGE, check=True)
    binary = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=PACKAGE, check=True,
                            capture_output=True, text=True).stdout.strip() + "/transport-bench"

    server = subprocess.Popen(pinned(0, [binary, "serve", "--port", str(args.port)]), stdout=subprocess.PIPE, text=True)
    server.stdout.readline()
    target = "127.0.0.1:%d" % args.port
    scenarios = [("unary", 1), ("unary", 16), ("stream", 4)]
    runs = {}
    commands = []
    try:
        for rep in range(args.reps):
            for kind, concurrency in scenarios:
                for transport in ("cm", "nio"):
                    argv = [binary, "run", "--transport", transport, "--target", target, "--kind", kind,
                            "--concurrency", str(concurrency), "--duration", str(args.duration), "--warmup", "1"]
                    if rep == 0:
                        commands.append(" ".join(pinned(1, argv)).replace(binary, "transport-bench"))
                    out = subprocess.run(pinned(1, argv), capture_output=True, text=True, timeout=300)
                    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
                    result = json.loads(line)
                    print(json.dumps(result), flush=True)
                    runs.setdefault((kind, concurrency, transport), []).append(result)
    finally:
        server.terminate()
        server.wait()

    def all_errors(reps):
        # Every run's errors, summed (a median hid one bad run), and a run that failed outright said as one.
        failed = sum(1 for r in reps if "errors" not in r)
        total = sum(int(r.get("errors", 0)) for r in reps)
        return "%d" % total + (" (%d of %d runs failed)" % (failed, len(reps)) if failed else "")

    def median(key, field):
        values = [r[field] for r in runs.get(key, []) if field in r]
        return statistics.median(values) if values else float("nan")

    lines = [
        "# ManagedClientTransport vs grpc-swift-nio-transport",
        "",
        "The generated `Echo_Echo.Client` (Examples/grpc-swift-2) over our transport (`cm`) and over",
        "grpc-swift-nio-transport 2.9.2 (`nio`), same embedded echo server, same run, interleaved; medians of %d runs"
        % args.reps,
        "of %g s each after 1 s of warm-up. Server on CPU 0, client on CPU 1. `cpu µs/call` is the client process's"
        % args.duration,
        "user+sys over the measured window divided by completed calls (for `stream`: per echoed message).",
        "",
        "Machine: %s, %d CPUs, %s. Date: %s." % (platform.machine(), os.cpu_count() or 0, platform.platform(),
                                               datetime.date.today().isoformat()),
        "Command: `python3 Perf/transport_bench.py --reps %d --duration %g` (`make bench-transport`)." % (
            args.reps, args.duration),
        "",
        "| scenario | transport | calls/s (stream: messages/s) | cpu µs/call (stream: /message) | p50 µs | p99 µs | errors (all runs) | cpu ratio cm/nio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, concurrency in scenarios:
        cm = median((kind, concurrency, "cm"), "cpu_us_per_rpc")
        nio = median((kind, concurrency, "nio"), "cpu_us_per_rpc")
        for transport in ("cm", "nio"):
            key = (kind, concurrency, transport)
            ratio = "%.2f" % (cm / nio) if transport == "cm" and nio == nio and nio > 0 else ""
            label = ("unary, %d in flight" % concurrency if kind == "unary"
                     else "bidi stream, %d streams x 64 messages in flight" % concurrency)
            lines.append("| %s | %s | %.0f | %.1f | %s | %s | %s | %s |" % (
                label, transport, median(key, "rps"), median(key, "cpu_us_per_rpc"),
                "%.0f" % median(key, "p50_us") if kind == "unary" else "-",
                "%.0f" % median(key, "p99_us") if kind == "unary" else "-",
                all_errors(runs.get(key, [])), ratio))
    lines += ["", "Commands of one repetition:", "", "```"] + commands + ["```", ""]
    with open(os.path.join(HERE, "RESULTS-transport.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
