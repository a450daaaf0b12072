"""What the bench scripts share: the peers' rig (a writable copy of Perf/peers, built), the C++ echo server, running
one client pinned to CPU 1, medians, and writing a section of Perf/RESULTS.md in place.

Each script writes its own section between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`, so the sections written
by hand (measurements of particular changes) stay where they are.
"""
import json, os, re, shutil, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "Perf", "peers")
# A writable copy of Perf/peers where they are built (PEERS_RIG to use another, e.g. one already built).
RIG = os.environ.get("PEERS_RIG", "/tmp/grpc-cm-peers")
RESULTS = os.path.join(ROOT, "Perf", "RESULTS.md")
PERF = os.path.join(ROOT, "Perf", "harness", ".build", "release", "grpc-cm-perf")
PORT = 50051


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def prepare(swift=True, python=False):
    """Copies Perf/peers over the rig (its build outputs stay), builds the C++ server and client, optionally the
    grpcio venv and the grpc-swift-2 peer (10-20 minutes the first time), and grpc-cm-perf. Returns the labels of
    the clients that built."""
    shutil.copytree(PEERS, RIG, dirs_exist_ok=True)
    sh(f"cd {RIG} && ./build.sh deps >/dev/null && ./build.sh cpp >/dev/null")
    clients = ["grpc-cm", "cpp"]
    if python:
        try:
            sh(f"cd {RIG} && ./build.sh python >/dev/null")
            clients.append("python")
        except subprocess.CalledProcessError:
            print("bench: no Python peer (venv/grpcio failed)", file=sys.stderr)
    if swift:
        sh(f"cd {RIG} && ./build.sh swift >/dev/null")
        clients.append("swift")
    sh(f"cd {ROOT}/Perf/harness && swift build -c release --product grpc-cm-perf >/dev/null")
    return clients


def client_cmd(label, options):
    """The command of one client with the options every client shares (see Perf/peers/README.md)."""
    common = ["--target", f"127.0.0.1:{PORT}", *options]
    if label == "grpc-cm":
        return [PERF, *common]
    if label == "cpp":
        return [f"{RIG}/build/grpc_bench", *common, "--threads", "1"]
    if label == "python":
        return [f"{RIG}/.venv/bin/python", f"{RIG}/python/grpc_bench.py", *common]
    if label == "h2load":
        return [sys.executable, f"{RIG}/h2load/h2load_bench.py", *common]
    if label == "swift":
        return [f"{RIG}/swift-peer/.build/release/SwiftPeer", *common, "--threads", "1"]
    raise SystemExit(f"bench: unknown client {label}")


def run(cmd, timeout):
    """Runs a client pinned to CPU 1; its last JSON line, or {"error": ...} (a client that fails, or that has not
    finished after `timeout` seconds: an overloaded open loop may never drain)."""
    try:
        r = subprocess.run(["taskset", "-c", "1", *cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:g} s"}
    line = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not line:
        return {"error": (r.stderr or r.stdout)[-300:]}
    return json.loads(line[-1])


class Server:
    """The C++ echo server of the rig pinned to CPU 0, for a `with` block."""

    def __enter__(self):
        self.pid = subprocess.run([f"{RIG}/start-server.sh", str(PORT)], capture_output=True, text=True).stdout.strip()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        # SIGTERM asks for a graceful shutdown, which waits for the calls it still holds: after an overloaded open
        # loop, thousands, and the server went on taking CPU 0 from the next run. SIGKILL after a moment.
        subprocess.run(["kill", self.pid])
        time.sleep(0.5)
        subprocess.run(["kill", "-9", self.pid], stderr=subprocess.DEVNULL)


def med(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def replace_section(name, text, path=RESULTS):
    """Writes `text` between this section's markers in RESULTS.md (appended at the end the first time)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = open(path).read() if os.path.exists(path) else "# Perf results\n"
    if begin in current and end in current:
        current = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, current, flags=re.S)
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(current)
    print(f"bench: wrote section {name} of {path}")
