#!/usr/bin/env bash
# The demo: start the embedded echo server, drive real calls through grpc-cm, ride out a server restart, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(swift build --show-bin-path)/grpc-cm"
PORT="${DEMO_PORT:-50651}"
TARGET="127.0.0.1:$PORT"
LOG="$(mktemp -d)/server.log"
server_pid=""

start_server() {
    "$BIN" serve --port "$PORT" 2>>"$LOG" &
    server_pid=$!
    for _ in $(seq 1 100); do
        grep -q "listening on" "$LOG" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "server did not start"; cat "$LOG"; exit 1
}
stop_server() {
    [ -n "$server_pid" ] && kill -INT "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
    server_pid=""
}
trap stop_server EXIT

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }
run() { set +e; eval "$1"; local rc=$?; set -e; echo "(exit status $rc)"; }

start_server
echo "embedded echo server on $TARGET (log: $LOG)"

step "echo: request bytes come back" "grpc-cm call --plaintext $TARGET /demo.Echo/Say --data-hex 68656c6c6f --hex"
run "$BIN call --plaintext $TARGET /demo.Echo/Say --data-hex 68656c6c6f --hex"

step "health check" "grpc-cm call --plaintext $TARGET /grpc.health.v1.Health/Check --hex   # 0801 = SERVING"
run "$BIN call --plaintext $TARGET /grpc.health.v1.Health/Check --hex"

step "a status on purpose: exit 64 + code" "grpc-cm call --plaintext -H 'x-fail-code: 14' -H 'x-fail-message: try later' $TARGET /demo.Echo/Say"
run "$BIN call --plaintext -H 'x-fail-code: 14' -H 'x-fail-message: try later' $TARGET /demo.Echo/Say"

step "deadline: the server sleeps 2 s, the call allows 0.2 s" "grpc-cm call --plaintext -H 'x-sleep-ms: 2000' --max-time 0.2 $TARGET /demo.Echo/Say"
run "$BIN call --plaintext -H 'x-sleep-ms: 2000' --max-time 0.2 $TARGET /demo.Echo/Say"

step "one client, many calls; the server restarts in the middle" "grpc-cm call --plaintext --repeat 12 --interval 0.25 --max-time 1 $TARGET /demo.Echo/Say"
set +e
"$BIN" call --plaintext --repeat 12 --interval 0.25 --max-time 1 "$TARGET" /demo.Echo/Say --data-hex 00 &
repeat_pid=$!
sleep 0.9
echo "   -- stopping the server --"
stop_server
sleep 0.8
echo "   -- starting it again --"
start_server
wait "$repeat_pid"
echo "(exit status $?: calls failed only while the server was down)"
set -e

stop_server
echo
echo "demo done"
