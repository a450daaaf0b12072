#!/usr/bin/env python3
"""make perf-gate: user-space instructions per unary call under callgrind, against the figures committed in
Perf/callgrind-baseline.json. Fails when a scenario costs more than 5 % above its figure.

Why instructions and not seconds: callgrind counts the same for the same binary and the same work whatever else the
machine does (a CI machine shares its cores), so a 5 % bound can be held without flakes. The workload is fixed:
`grpc-cm-perf --requests N` makes exactly N unary calls, K in flight, against the embedded echo server running
natively in another process (pinned to CPU 0; its instructions are not counted). Two runs of different lengths
(--small and --large calls) are subtracted, so start-up, connection set-up and the first allocations cancel out:

    instructions per call = (I(large) - I(small)) / (large - small)

The harness leaves its latency percentiles out (--no-percentiles): computing them walks every distinct recorded
value, more of them in the longer run, so that work did not cancel out. It added about 110 to 150 instructions to
the figure at (b) and let runs of the same build differ by up to about 100; without it they agree within about 10.

  Perf/gate.py [--update] [--small 2000] [--large 12000] [--tolerance 0.05]

--update rewrites the baseline with today's figures (commit it with the change that earned it).

  Perf/gate.py --report --scenarios b-64-in-flight --extra "--loops 2 --connections 2"

--extra passes more options to grpc-cm-perf (a group of loops, user timers and fds on the loop, ...); with --report
the figures are printed and nothing is compared: how Perf/RESULTS.md measures what such a setting costs per call.
"""
import argparse, json, os, shutil, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "Perf", "callgrind-baseline.json")
# (name, calls in flight, scenario options): (a) one call at a time, every call its own loop turn; (b) 64 in flight
# on one connection; (c) as (b), each call with a 30 s deadline, as most real calls have one: a timer armed and
# cancelled, grpc-timeout sent, and the echo server's answer carries one custom field (x-received-grpc-timeout),
# as responses with metadata do.
SCENARIOS = [("a-1-in-flight", 1, []), ("b-64-in-flight", 64, []), ("c-64-in-flight-deadline", 64, ["--timeout", "30"])]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu, cmd):
    # Pinning keeps the server and the client off each other's core where there are two; harmless elsewhere.
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu), *cmd]
    return cmd


def instructions(binary, port, concurrency, calls, extra=()):
    r = subprocess.run(
        pinned(1, ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", binary,
                   "--target", f"127.0.0.1:{port}", "--concurrency", str(concurrency), "--requests", str(calls),
                   "--no-percentiles", *extra]),  # see the docstring
        capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines or "Collected :" not in r.stderr:
        raise SystemExit(f"perf-gate: the run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["requests"] != calls or result["errors"] != 0:
        raise SystemExit(f"perf-gate: expected {calls} calls without errors, got {result}")
    return int(r.stderr.split("Collected :")[-1].split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--update", action="store_true", help="write today's figures as the baseline")
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=12000)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--scenarios", default=",".join(name for name, _, _ in SCENARIOS), help="comma-separated names")
    ap.add_argument("--extra", default="", help="more grpc-cm-perf options, e.g. \"--loops 2 --connections 2\"")
    ap.add_argument("--report", action="store_true", help="print the figures; compare nothing")
    args = ap.parse_args()
    chosen = args.scenarios.split(",")
    extra = args.extra.split()

    if not shutil.which("valgrind"):
        raise SystemExit("perf-gate: valgrind is missing (scripts/install-deps.sh installs it)")
    harness = os.path.join(ROOT, "Perf", "harness")
    subprocess.run(["swift", "build", "-c", "release", "--product", "grpc-cm-perf"], cwd=harness, check=True,
                   stdout=subprocess.DEVNULL)
    built = os.path.join(harness, ".build", "release", "grpc-cm-perf")
    # valgrind 3.19 cannot read the DWARF 5 that Swift emits: measure a copy without debug info.
    binary = os.path.join(harness, ".build", "grpc-cm-perf-nodebug")
    subprocess.run(["objcopy", "--strip-debug", built, binary], check=True)

    port = free_port()
    server = subprocess.Popen(pinned(0, [built, "--serve-port", str(port)]))
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("perf-gate: the echo server did not start")
                time.sleep(0.1)
        measured = {}
        for name, concurrency, options in SCENARIOS:
            if name not in chosen:
                continue
            small = instructions(binary, port, concurrency, args.small, options + extra)
            large = instructions(binary, port, concurrency, args.large, options + extra)
            measured[name] = round((large - small) / (args.large - args.small))
    finally:
        server.kill()
        server.wait()

    if args.report:
        for name, value in measured.items():
            print(f"perf-gate: {name} {' '.join(extra)}: {value} instructions per call")
        return

    if args.update:
        with open(BASELINE, "w") as f:
            json.dump({"instructions_per_call": measured,
                       "command": f"Perf/gate.py --small {args.small} --large {args.large}"}, f, indent=2)
            f.write("\n")
        print(f"perf-gate: baseline written: {measured}")
        return

    with open(BASELINE) as f:
        baseline = json.load(f)["instructions_per_call"]
    failed = False
    for name, value in measured.items():
        base = baseline[name]
        ratio = value / base
        verdict = "ok"
        if ratio > 1 + args.tolerance:
            verdict = f"FAIL: more than {args.tolerance:.0%} above the baseline"
            failed = True
        elif ratio < 1 - args.tolerance:
            verdict = "ok, and well below the baseline: lower it with `Perf/gate.py --update`"
        print(f"perf-gate: {name}: {value} instructions per call (baseline {base}, x{ratio:.3f}) {verdict}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
