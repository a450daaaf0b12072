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
    # Ready when this server's own "listening on" line is in: the log keeps the earlier servers' lines too.
    local before
    before=$(grep -c "listening on" "$LOG" 2>/dev/null || true)
    "$BIN" serve --port "$PORT" 2>>"$LOG" &
    server_pid=$!
    for _ in $(seq 1 100); do
        [ "$(grep -c "listening on" "$LOG" 2>/dev/null || true)" -gt "${before:-0}" ] && return 0
        kill -0 "$server_pid" 2>/dev/null || break
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

METRICS="$(dirname "$LOG")/metrics.txt"

step "retry: the server fails the first 2 attempts of this request; the third succeeds" \
    "grpc-cm call --plaintext -H 'x-fail-first: 2' -H 'x-request-key: demo-1' --metrics-out metrics.txt $TARGET /demo.Echo/Say --data-hex 6f6b --hex"
run "$BIN call --plaintext -H 'x-fail-first: 2' -H 'x-request-key: demo-1' --metrics-out $METRICS $TARGET /demo.Echo/Say --data-hex 6f6b --hex"
grep -E '^grpc_client_(retries|requests)_total' "$METRICS" || true

step "one client, many calls; the server stops and comes back: reconnection, breaker open then closed" \
    "grpc-cm call --plaintext --repeat 24 --interval 0.2 --max-time 1 --breaker-timeout 1 --metrics-out metrics.txt $TARGET /demo.Echo/Say"
set +e
"$BIN" call --plaintext --repeat 24 --interval 0.2 --max-time 1 --breaker-timeout 1 --metrics-out "$METRICS" \
    "$TARGET" /demo.Echo/Say --data-hex 00 &
repeat_pid=$!
sleep 0.7
echo "   -- stopping the server --"
stop_server
sleep 1.6
echo "   -- starting it again --"
start_server
wait "$repeat_pid"
echo "(exit status $?: calls failed while the server was down, the breaker refused calls without touching the"
echo " network once 5 had failed, then a probe after 1 s found the server back and closed it)"
set -e
# The demo fails unless the server is back and serving.
"$BIN" call --plaintext --max-time 5 "$TARGET" /demo.Echo/Say --data-hex 00 > /dev/null

step "metrics (Prometheus text, written by --metrics-out at exit)" "grep grpc_client_ metrics.txt"
grep -E '^grpc_client_(requests_total|retries_total|circuit_breaker_state|connections_active|connect_failures_total|connection_state)' "$METRICS" | sort

step "streaming through a generated grpc-swift-2 client on our transport: one call of each kind" \
    "swift run grpc-swift-2-example $TARGET"
run "$(dirname "$BIN")/grpc-swift-2-example $TARGET"

stop_server
echo
echo "demo done"
