import Foundation

/// The reference implementation as an independent peer: a grpcio server with a generic handler, written and started
/// by the tests. It echoes the request, honours `x-fail-code`/`x-fail-message` and `x-sleep-ms` like our server,
/// echoes custom metadata (including `-bin`) as initial metadata, and serves grpc.health.v1 (grpcio-health-checking).
/// Methods named `Expand`, `Collect` and `Update` stream like the embedded server's (protobuf `text` for the
/// `echo.Echo` service, raw bytes otherwise), with `x-response-count`/`x-response-bytes` and `x-fail-after`.
/// `x-compress-response gzip|deflate` compresses a call's responses; `compression:` every call's.
final class PythonPeer: @unchecked Sendable {
    // `@unchecked`: `process` is set once in init and only read afterwards.
    let port: Int
    private let process: Process

    static let script = #"""
        import os, sys, time, urllib.parse
        from concurrent import futures
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        CODES = {c.value[0]: c for c in grpc.StatusCode}

        def begin(context):
            md = list(context.invocation_metadata())
            values = dict(md)
            echoed = [(k, v) for (k, v) in md
                      if not k.startswith(("x-fail", "x-sleep", "x-response", ":", "grpc-"))
                      and k not in ("user-agent", "te", "content-type")]
            # GRPC_CM_PEER_NAME: every answer says which backend gave it (x-peer).
            if os.environ.get("GRPC_CM_PEER_NAME"):
                echoed.append(("x-peer", os.environ["GRPC_CM_PEER_NAME"]))
            # x-compress-response gzip|deflate: this call's responses compressed (when the client accepts it).
            choice = values.get("x-compress-response")
            if choice:
                context.set_compression({"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}[choice])
            context.send_initial_metadata(echoed)
            return values

        def fail(context, values):
            code = int(values.get("x-fail-code", "13"))
            context.abort(CODES[code], urllib.parse.unquote(values.get("x-fail-message", "")))

        def echo(request, context):
            values = dict(context.invocation_metadata())
            # GRPC_CM_PEER_SLEEP_MS: every unary call of this backend is slow; GRPC_CM_PEER_FAIL_CODE: every one fails.
            sleep_ms = int(values.get("x-sleep-ms", os.environ.get("GRPC_CM_PEER_SLEEP_MS", "0")))
            if sleep_ms:
                time.sleep(sleep_ms / 1000.0)
            if os.environ.get("GRPC_CM_PEER_FAIL_CODE"):
                # A backend that fails every call answers trailers-only, before any header, as an overloaded server
                # does (headers first would commit a hedged call to it, gRFC A6).
                fail(context, {"x-fail-code": os.environ["GRPC_CM_PEER_FAIL_CODE"]})
            begin(context)
            if int(values.get("x-fail-code", "0")):
                fail(context, values)
            return request

        def pb_decode(data):
            # The text field (1) of echo.EchoRequest, parsed by hand: no generated code needed.
            i, text = 0, b""
            def varint():
                nonlocal i
                value, shift = 0, 0
                while True:
                    b = data[i]; i += 1
                    value |= (b & 0x7F) << shift
                    if b < 0x80: return value
                    shift += 7
            while i < len(data):
                key = varint()
                if key & 7 == 2:
                    n = varint()
                    if key >> 3 == 1: text = data[i:i + n]
                    i += n
                elif key & 7 == 0: varint()
                elif key & 7 == 1: i += 8
                elif key & 7 == 5: i += 4
                else: break
            return text

        def pb_encode(text):
            if not text: return b""
            out, n = bytearray(b"\x0a"), len(text)
            while n >= 0x80:
                out.append((n & 0x7F) | 0x80); n >>= 7
            out.append(n)
            return bytes(out) + text

        def make_streaming(method):
            proto = method.startswith("/echo.Echo/")
            dec = pb_decode if proto else (lambda b: b)
            enc = pb_encode if proto else (lambda b: b)
            def expand(request, context):
                values = begin(context)
                fail_after = int(values.get("x-fail-after", "-1"))
                count = int(values.get("x-response-count", "-1"))
                if count >= 0:
                    items = (b"a" * int(values.get("x-response-bytes", "0")) for _ in range(count))
                else:
                    items = (w for w in dec(request).split(b" ") if w)
                if fail_after == 0: fail(context, values)
                sent = 0
                for item in items:
                    yield enc(item)
                    sent += 1
                    if sent == fail_after: fail(context, values)
            def collect(requests, context):
                values = begin(context)
                if "x-fail-code" in values: fail(context, values)
                return enc(b" ".join(dec(r) for r in requests))
            def update(requests, context):
                values = begin(context)
                fail_after = int(values.get("x-fail-after", "-1"))
                if fail_after == 0: fail(context, values)
                sent = 0
                for r in requests:
                    yield enc(dec(r))
                    sent += 1
                    if sent == fail_after: fail(context, values)
            name = method.rsplit("/", 1)[-1]
            if name == "Expand": return grpc.unary_stream_rpc_method_handler(expand)
            if name == "Collect": return grpc.stream_unary_rpc_method_handler(collect)
            if name == "Update": return grpc.stream_stream_rpc_method_handler(update)
            return None

        class Generic(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method.startswith("/grpc.health.v1."):
                    return None
                return make_streaming(details.method) or grpc.unary_unary_rpc_method_handler(echo)

        # GRPC_CM_PEER_COMPRESSION=gzip|deflate: every response compressed that the client accepts.
        compression = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}.get(
            os.environ.get("GRPC_CM_PEER_COMPRESSION", ""), grpc.Compression.NoCompression)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), compression=compression)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_servicer.set("sleepy", health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_generic_rpc_handlers((Generic(),))
        address = "127.0.0.1:%d" % (int(sys.argv[1]) if len(sys.argv) > 1 else 0)
        if len(sys.argv) > 3:
            with open(sys.argv[2], "rb") as cert, open(sys.argv[3], "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        server.start()
        print(port, flush=True)
        # Commands on stdin: "set NAME STATUS" ("-" = the whole server) changes a health status. EOF stops.
        for line in sys.stdin:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "set":
                name = "" if parts[1] == "-" else parts[1]
                health_servicer.set(name, getattr(health_pb2.HealthCheckResponse, parts[2]))
        server.stop(0)
        """#

    /// Starts the server (on `port`, or a free one); throws if python3 or grpcio is missing (`make test` installs
    /// them).
    /// - Parameter compression: "gzip" or "deflate": the server compresses every response the client accepts.
    /// - Parameter name: Sent back as `x-peer` on every answer (which backend served a call).
    init(
        port: Int = 0, tlsCertificate: String? = nil, tlsKey: String? = nil, compression: String? = nil,
        name: String? = nil, sleepMilliseconds: Int? = nil, failCode: Int? = nil
    ) throws {
        ignoreSIGPIPE()
        let scriptURL = FileManager.default.temporaryDirectory.appendingPathComponent("grpc-cm-peer-\(getpid()).py")
        try Self.script.write(to: scriptURL, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", scriptURL.path, String(port)] + [tlsCertificate, tlsKey].compactMap { $0 }
        var environment: [String: String] = [:]
        if let compression { environment["GRPC_CM_PEER_COMPRESSION"] = compression }
        if let name { environment["GRPC_CM_PEER_NAME"] = name }
        if let sleepMilliseconds { environment["GRPC_CM_PEER_SLEEP_MS"] = String(sleepMilliseconds) }
        if let failCode { environment["GRPC_CM_PEER_FAIL_CODE"] = String(failCode) }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment, uniquingKeysWith: { $1 })
        }
        let output = Pipe()
        let input = Pipe()
        process.standardOutput = output
        process.standardInput = input
        try process.run()
        self.process = process
        // The first line is the port.
        guard let port = readLine(output.fileHandleForReading.fileDescriptor).flatMap({ Int($0) }) else {
            process.terminate()
            throw PeerError.didNotStart
        }
        self.port = port
        // Keep stdin open until stop(): the script exits when it closes.
        self.stdin = input
    }

    private var stdin: Pipe?

    enum PeerError: Error {
        case didNotStart
    }

    var target: String { "127.0.0.1:\(self.port)" }

    var pid: Int32 { self.process.processIdentifier }

    /// Changes the health status of `service` ("" = the whole server) to SERVING, NOT_SERVING, ...
    func setHealth(_ service: String, _ status: String) {
        let line = "set \(service.isEmpty ? "-" : service) \(status)\n"
        self.stdin?.fileHandleForWriting.write(line.data(using: .utf8)!)
    }

    /// Kills the server with SIGKILL (no GOAWAY, no FIN handshake it chose: the kernel resets its connections) and
    /// waits until the process is gone.
    func killHard() {
        kill(self.process.processIdentifier, SIGKILL)
        self.process.waitUntilExit()
    }

    /// Closes the script's stdin (it stops the server and exits), then makes sure the process is gone.
    func stop() {
        try? self.stdin?.fileHandleForWriting.close()
        let pid = self.process.processIdentifier
        for _ in 0..<200 where self.process.isRunning { usleep(10_000) }
        if self.process.isRunning { kill(pid, SIGKILL) }
        self.process.waitUntilExit()
    }
}
