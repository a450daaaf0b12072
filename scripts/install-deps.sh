#!/usr/bin/env bash
# Installs what is missing, and only that.
#
#   scripts/install-deps.sh build   what building and running the package needs (make build, demo, demo-tls):
#                                   Debian libnghttp2-dev libssl-dev zlib1g-dev libc-ares-dev pkg-config (HTTP/2,
#                                   TLS, message compression and DNS, linked as system libraries; at run time only
#                                   libnghttp2-14, libssl3, zlib1g and libc-ares2 are used) and openssl
#                                   (the certificates of make demo-tls)
#   scripts/install-deps.sh test    that, plus what the tests need (make test): Debian valgrind (the
#                                   instruction-count gate), etcd-server (the etcd discovery tests) and python3 with pip; PyPI grpcio and
#                                   grpcio-health-checking (the reference peer), h2 (the scripted HTTP/2 peers)
set -euo pipefail

what="${1:-test}"
packages=(libnghttp2-dev libssl-dev zlib1g-dev libc-ares-dev pkg-config openssl)  # openssl: the certificates of make demo-tls
if [ "$what" = "test" ]; then
    packages+=(valgrind python3 etcd-server)  # etcd-server: the discovery tests start one on loopback
    # pip itself: a minimal Debian has python3 without it.
    python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
fi

missing=()
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ "$what" = "test" ] || exit 0

if ! python3 -c 'import grpc, grpc_health.v1.health, h2' >/dev/null 2>&1; then
    echo "install-deps: pip install grpcio grpcio-health-checking h2"
    # Debian's python3 refuses a plain pip install (PEP 668) unless told that is intended.
    python3 -m pip install -q grpcio grpcio-health-checking h2 2>/dev/null \
        || python3 -m pip install -q --break-system-packages grpcio grpcio-health-checking h2
fi
