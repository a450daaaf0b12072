#!/usr/bin/env bash
# The demo over TLS: certificates made now with openssl, the embedded server with TLS (and then mutual TLS),
# verified calls, the failures a person should understand, and the TLS example program.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(swift build --show-bin-path)/grpc-cm"
EXAMPLE="$(swift build --show-bin-path)/tls-example"
PORT="${DEMO_TLS_PORT:-50652}"
DIR="$(mktemp -d)"
server_pid=""
stop_server() {
    [ -n "$server_pid" ] && kill -INT "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
    server_pid=""
}
trap 'stop_server; rm -rf "$DIR"' EXIT

(
    cd "$DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=demo CA" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 \
        -extfile server.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=demo client" 2>/dev/null
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 2>/dev/null
)
starts=0
start_server() {
    # A log of its own per start: truncating the last one happens in the child, after this shell may have read it.
    starts=$((starts + 1))
    local log="$DIR/server.$starts.log"
    "$BIN" serve --port "$PORT" --tls-cert "$DIR/server.pem" --tls-key "$DIR/server.key" "$@" 2>"$log" &
    server_pid=$!
    for _ in $(seq 1 100); do
        grep -q "listening on" "$log" 2>/dev/null && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    cat "$log"; exit 1
}
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }
run() { set +e; eval "$1"; local rc=$?; set -e; echo "(exit status $rc)"; }

start_server
step "TLS call, verified against our CA" "grpc-cm call --cacert ca.pem localhost:$PORT /demo.Echo/Say --data-hex 736563757265 --hex"
run "$BIN call --cacert $DIR/ca.pem localhost:$PORT /demo.Echo/Say --data-hex 736563757265 --hex"
step "the system trust store does not know our CA" "grpc-cm call localhost:$PORT /demo.Echo/Say"
run "$BIN call localhost:$PORT /demo.Echo/Say"
step "a name the certificate does not carry" "grpc-cm call --cacert ca.pem --servername other.example localhost:$PORT /demo.Echo/Say"
run "$BIN call --cacert $DIR/ca.pem --servername other.example localhost:$PORT /demo.Echo/Say"
step "--insecure skips verification (only when asked)" "grpc-cm call --insecure localhost:$PORT /demo.Echo/Say --data-hex 6f6b --hex"
run "$BIN call --insecure localhost:$PORT /demo.Echo/Say --data-hex 6f6b --hex"
step "health over TLS, as grpc_health_probe" "grpc-cm health -addr=localhost:$PORT -tls -tls-ca-cert=ca.pem"
run "$BIN health -addr=localhost:$PORT -tls -tls-ca-cert=$DIR/ca.pem"
step "the TLS example (the Go original's): all features on, the health map" "tls-example localhost:$PORT ca.pem"
run "$EXAMPLE localhost:$PORT $DIR/ca.pem"
stop_server

start_server --client-ca "$DIR/ca.pem"
step "mutual TLS: with a client certificate" "grpc-cm call --cacert ca.pem --cert client.pem --key client.key localhost:$PORT /demo.Echo/Say --data-hex 6d746c73 --hex"
run "$BIN call --cacert $DIR/ca.pem --cert $DIR/client.pem --key $DIR/client.key localhost:$PORT /demo.Echo/Say --data-hex 6d746c73 --hex"
step "mutual TLS: without one" "grpc-cm call --cacert ca.pem localhost:$PORT /demo.Echo/Say"
run "$BIN call --cacert $DIR/ca.pem localhost:$PORT /demo.Echo/Say"
stop_server
echo
echo "TLS demo done"
