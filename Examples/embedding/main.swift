// A host service on the same event loop as its gRPC clients.
//
//   swift run embedding-example              starts the embedded echo server, makes calls from callbacks, fetches
//                                             its own /metrics and /healthz over TCP, prints them, exits 0
//   swift run embedding-example --serve [TARGET]
//                                             keeps serving /metrics and /healthz (and calling TARGET, or the
//                                             embedded server) until SIGINT or SIGTERM
//
// Everything runs on one loop: the service's own HTTP/1.1 endpoint (a listening socket and its connections,
// registered with `register(fd:interest:_:)`), a timer that starts a call every 20 ms, the completions that count
// them, the gRPC connections, and the echo server. Nothing blocks the loop; no lock is needed, because all of the
// service's state is touched on the loop's thread only.
import CStopSignals
import GRPCConnectionManager
import GRPCConnectionManagerPrometheus
import GRPCEchoServer
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

let arguments = CommandLine.arguments
let serveForever = arguments.contains("--serve")
let explicitTarget = arguments.dropFirst().first { !$0.hasPrefix("--") }

let loop = try ReactorLoop()
loop.start()

// The embedded echo server, on the same loop, unless a target was given.
let server = explicitTarget == nil ? try EchoServer(eventLoop: loop) : nil
let target = explicitTarget ?? server!.address

var configuration = Configuration()
configuration.enableMetrics = true
let metrics = PrometheusMetrics()
let manager = try ConnectionManager(configuration: configuration, metricsFactory: metrics, eventLoop: loop)
let channel = try manager.connection(service: "echo", address: target)

/// The service's own state: touched on the loop's thread only (every entry point below runs there).
final class Service: @unchecked Sendable {
    // `@unchecked`: loop thread only.
    let loop: ReactorLoop
    let channel: GRPCChannel
    let manager: ConnectionManager
    var started = 0
    var succeeded = 0
    var failed = 0
    var ticker: LoopTimer?
    var endpoint: HTTPEndpoint?

    init(loop: ReactorLoop, channel: GRPCChannel, manager: ConnectionManager) {
        self.loop = loop
        self.channel = channel
        self.manager = manager
    }

    /// One call now, and the next in 20 ms: calls started from timer callbacks, completed in completions.
    func tick(limit: Int?) {
        if let limit, self.started >= limit { return }
        self.started += 1
        let payload = Array("call \(self.started)".utf8)
        self.channel.unary(path: "/echo.Echo/Get", request: payload, options: RequestOptions(timeout: .seconds(2))) {
            response in
            if response.status.isOK && response.message == payload { self.succeeded += 1 } else { self.failed += 1 }
        }
        self.ticker = self.loop.scheduleTimer(after: .milliseconds(20)) { self.tick(limit: limit) }
    }

    /// What `/metrics` and `/healthz` answer.
    func respond(to path: String) -> (status: String, body: String) {
        switch path {
        case "/metrics":
            let own = "# TYPE embedding_calls_total counter\nembedding_calls_total{outcome=\"ok\"} \(self.succeeded)\n"
                + "embedding_calls_total{outcome=\"failed\"} \(self.failed)\n"
            return ("200 OK", own + (self.manager.metricsText() ?? ""))
        case "/healthz":
            return self.failed == 0 ? ("200 OK", "ok\n") : ("503 Service Unavailable", "\(self.failed) calls failed\n")
        default:
            return ("404 Not Found", "not found\n")
        }
    }
}

/// A small HTTP/1.1 endpoint written on the loop API: a nonblocking listening socket, and one registration per
/// connection that reads a request, answers it and closes. The loop never closes these fds; this code does.
final class HTTPEndpoint: @unchecked Sendable {
    // `@unchecked`: loop thread only.
    let loop: ReactorLoop
    let listenFD: Int32
    let port: Int
    private var listener: LoopRegistration?
    private var connections: [Int32: (registration: LoopRegistration, request: [UInt8])] = [:]
    private let respond: (String) -> (status: String, body: String)

    init(loop: ReactorLoop, respond: @escaping (String) -> (status: String, body: String)) throws {
        self.loop = loop
        self.respond = respond
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Int32 in
                guard bind(fd, pointer, length) == 0, listen(fd, 64) == 0 else { return -1 }
                return getsockname(fd, pointer, &length)
            }
        }
        guard bound == 0 else { throw ReactorError(operation: "listen on 127.0.0.1", errno: errno) }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        self.listenFD = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    /// Starts accepting. Loop thread.
    func start() throws {
        self.listener = try self.loop.register(fd: self.listenFD, interest: .readable) { _ in self.acceptAll() }
    }

    private func acceptAll() {
        while true {
            let client = accept(self.listenFD, nil, nil)
            if client < 0 { return }  // EAGAIN: the next readiness brings the next one
            _ = fcntl(client, F_SETFL, fcntl(client, F_GETFL) | O_NONBLOCK)
            guard let registration = try? self.loop.register(fd: client, interest: .readable, { _ in self.read(client) })
            else {
                close(client)
                continue
            }
            self.connections[client] = (registration, [])
        }
    }

    private func read(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        if n == 0 || (n < 0 && errno != EAGAIN) {
            self.finish(fd)
            return
        }
        if n < 0 { return }
        self.connections[fd]?.request.append(contentsOf: buffer[0..<n])
        guard let request = self.connections[fd]?.request, let end = Self.headerEnd(request) else { return }
        // "GET /path HTTP/1.1": the second word is the path.
        let line = String(decoding: request[..<end].prefix { $0 != UInt8(ascii: "\r") }, as: UTF8.self)
        let words = line.split(separator: " ")
        let path = words.count > 1 ? String(words[1]) : "/"
        let (status, body) = self.respond(path)
        let reply = "HTTP/1.1 \(status)\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\n"
            + "Connection: close\r\n\r\n\(body)"
        // Small answers: one write takes them (a large one would wait for writability, like the library does).
        _ = Array(reply.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        self.finish(fd)
    }

    private static func headerEnd(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 4 else { return nil }
        for index in 0...(bytes.count - 4)
        where bytes[index] == 13 && bytes[index + 1] == 10 && bytes[index + 2] == 13 && bytes[index + 3] == 10 {
            return index
        }
        return nil
    }

    private func finish(_ fd: Int32) {
        guard let connection = self.connections.removeValue(forKey: fd) else { return }
        connection.registration.deregister()
        close(fd)
    }

    /// Stops accepting and closes every connection. Loop thread.
    func stop() {
        self.listener?.deregister()
        close(self.listenFD)
        for fd in Array(self.connections.keys) { self.finish(fd) }
    }
}

/// GET over a plain blocking socket, from another thread: what an operator's scraper would do.
func fetch(_ path: String, port: Int) -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else { return "connect failed: errno \(errno)" }
    let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".utf8)
    _ = request.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    var response: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        response.append(contentsOf: buffer[0..<n])
    }
    return String(decoding: response, as: UTF8.self)
}

let service = Service(loop: loop, channel: channel, manager: manager)
let endpoint = try HTTPEndpoint(loop: loop) { path in service.respond(to: path) }
service.endpoint = endpoint
let limit = serveForever ? nil : 50
loop.execute {
    do {
        try endpoint.start()
    } catch {
        print("embedding-example: \(error)")
    }
    service.tick(limit: limit)
}
// Signals first, then the line that says we serve: whoever waits for that line may send SIGTERM at once.
if serveForever { css_install_stop_signals() }
print("embedding-example: serving http://127.0.0.1:\(endpoint.port)/metrics and /healthz, calling \(target)")
// A pipe makes stdout block-buffered; a supervisor reading our output must see the line now.
fflush(nil)  // nil flushes every output stream, stdout included, without touching the global

/// Ends everything on the loop, then stops it: the endpoint closes, the manager closes its connections.
func stopAll() {
    loop.execute {
        service.ticker?.cancel()
        endpoint.stop()
        manager.closeNow()
        server?.close()
    }
    loop.shutdown()
}

if serveForever {
    while css_stop_signal_received() == 0 { usleep(100_000) }
    print("embedding-example: signal \(css_stop_signal_received()), shutting down")
    stopAll()
    exit(0)
}

// Wait for the calls, then scrape ourselves like Prometheus would.
let done = Atomic<Bool>(false)
for _ in 0..<500 {
    loop.execute { if service.succeeded + service.failed >= 50 { done.store(true, ordering: .releasing) } }
    if done.load(ordering: .acquiring) { break }
    usleep(20_000)
}
let metricsPage = fetch("/metrics", port: endpoint.port)
let healthPage = fetch("/healthz", port: endpoint.port)
print("GET /healthz ->\n\(healthPage)\n")
print("GET /metrics (the lines about calls) ->")
for line in metricsPage.split(whereSeparator: \.isNewline)
where line.hasPrefix("embedding_calls_total") || line.hasPrefix("grpc_client_requests_total") {
    print("  \(line)")
}
let healthy = healthPage.hasPrefix("HTTP/1.1 200") && metricsPage.contains("embedding_calls_total{outcome=\"ok\"} 50")
stopAll()
print(healthy ? "embedding-example: 50 calls OK, /metrics and /healthz served from the loop" : "embedding-example: FAILED")
exit(healthy ? 0 : 1)
