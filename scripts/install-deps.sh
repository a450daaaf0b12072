#!/usr/bin/env bash
# Installs what the build and the tests need, only when it is missing:
#   Debian: libnghttp2-dev libssl-dev pkg-config (HTTP/2 and TLS, linked as system libraries)
#   PyPI:   grpcio grpcio-health-checking (the reference gRPC implementation the tests run as a peer), h2 (the
#           scripted misbehaving HTTP/2 peers)
set -euo pipefail

missing=()
# openssl (the CLI) makes the certificates of the TLS tests and the TLS demo; valgrind counts instructions for the
# performance gate (make perf-gate).
for pkg in libnghttp2-dev libssl-dev pkg-config openssl valgrind; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# h2 (hyperframe, hpack) crafts the frames of the scripted misbehaving HTTP/2 peers of the tests.
if ! python3 -c 'import grpc, grpc_health.v1.health, h2' >/dev/null 2>&1; then
    echo "install-deps: pip install grpcio grpcio-health-checking h2"
    python3 -m pip install -q grpcio grpcio-health-checking h2 2>/dev/null \
        || python3 -m pip install -q --break-system-packages grpcio grpcio-health-checking h2
fi
