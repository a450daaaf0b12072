import CNghttp2
import CReactor
import Synchronization
@_spi(Reactor) import GRPCCMReactor
import GRPCCMTransport
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// A small gRPC server on the same reactor as the client, for the demo, the tests and the benchmarks.
///
/// - Any method echoes the request message (`x-response-bytes: N` answers N bytes instead).
/// - `grpc.health.v1.Health/Check` answers SERVING for "" and for the services in `Options.healthyServices`,
///   NOT_SERVING for `Options.notServingServices`, NOT_FOUND otherwise.
/// - Test metadata provokes failures on purpose: `x-fail-code` / `x-fail-message` answer with that status
///   (trailers-only), `x-sleep-ms` answers later (a reactor timer, never a blocked thread), `x-fail-first: N` with
///   `x-request-key: K` fails the first N attempts of key K (with `x-fail-code`, UNAVAILABLE by default), and
///   `x-pushback-ms: V` adds `grpc-retry-pushback-ms: V` to a failure (`V1,V2,...`: the value for each attempt in
///   turn, by its `grpc-previous-rpc-attempts`; an empty one, none). With `x-request-key: K`, `x-refuse-first: N`
///   resets the first N attempts with REFUSED_STREAM and `x-goaway-first: N` answers the first N with a GOAWAY whose
///   last stream id is below theirs: both leave the request unprocessed, for testing transparent retry.
/// - The `grpc-timeout` a request carried comes back in the response header `x-received-grpc-timeout`.
/// - Request metadata that is not reserved is echoed back in the response headers.
public final class EchoServer: Sendable {
    /// Server settings.
    public struct Options: Sendable {
        /// SETTINGS_MAX_CONCURRENT_STREAMS announced to clients. Default 100.
        public var maxConcurrentStreams: Int = 100
        /// Largest request message accepted (bigger ones end with RESOURCE_EXHAUSTED). Default 16 MiB.
        public var maxReceiveMessageSize: Int = 16 << 20
        /// Request bytes a stream may hold until it answers (unary, `Collect`, `Expand` answer once the client
        /// half-closes): past this, the call ends RESOURCE_EXHAUSTED and what it held is let go. Default 64 MiB.
        public var maxHeldRequestBytes: Int = 64 << 20
        /// Response bytes a stream may have waiting for the client's window: past this, the server takes no more of
        /// the stream's requests (their bytes are not returned to the client's window) until the client reads. A
        /// client that writes to `Update` and never reads then blocks, instead of growing the server. Default 4 MiB.
        public var maxPendingResponseBytes: Int = 4 << 20
        /// Services that report SERVING besides "" (the whole server).
        public var healthyServices: Set<String> = []
        /// Services that report NOT_SERVING.
        public var notServingServices: Set<String> = []
        /// Serve TLS with this certificate chain and key (PEM files); nil: plaintext h2c.
        public var tlsCertificateChain: String?
        public var tlsPrivateKey: String?
        /// With TLS: require client certificates signed by this CA (mutual TLS).
        public var tlsClientCA: String?
        /// How long a new connection has to finish its TLS handshake (with TLS) and send the HTTP/2 preface and its
        /// SETTINGS: past it, the connection is closed. A client that connects and says nothing would otherwise hold
        /// an fd and a connection's memory for as long as it likes. Default 10 s.
        public var handshakeTimeout: Duration = .seconds(10)

        public init() {}
    }

    /// The bound port (0 for Unix sockets).
    public let port: Int
    /// Where it listens, e.g. `127.0.0.1:50051`.
    public let address: String
    let listener: EchoListener
    let reactor: Reactor

    /// Binds and starts serving on `eventLoop` (a new one, started on its own thread, when nil).
    /// - Parameters:
    ///   - host: A numeric IPv4/IPv6 address, or `unix:/path`. Default 127.0.0.1.
    ///   - port: 0 picks a free port.
    /// - Throws: `ReactorError` when the address cannot be bound.
    public init(host: String = "127.0.0.1", port: Int = 0, options: Options = Options(), eventLoop: ReactorLoop? = nil)
        throws
    {
        let loop: ReactorLoop
        if let eventLoop {
            loop = eventLoop
        } else {
            loop = try ReactorLoop()
            loop.start()
        }
        self.reactor = loop.reactor
        let socketAddress: NetworkAddress
        let unixPath = host.hasPrefix("unix:") ? String(host.dropFirst(5)) : nil
        if let path = unixPath {
            // A stale socket of a server that is gone is replaced; anything else at the path is left alone.
            let claimed = cr_unix_path_claim(path)
            switch -claimed {
            case 0: break
            case EEXIST: throw ReactorError(operation: "listen on \(host) (a file that is not a socket is there)", errno: EEXIST)
            case EADDRINUSE: throw ReactorError(operation: "listen on \(host) (another server listens there)", errno: EADDRINUSE)
            default: throw ReactorError(operation: "check \(host) for a stale socket", errno: -claimed)
            }
            socketAddress = NetworkAddress(unixPath: path)
        } else {
            guard let address = NetworkAddress(ip: host, port: port) else {
                throw ConfigurationError(field: "host", message: "\"\(host)\" is not a numeric IP address")
            }
            socketAddress = address
        }
        var tls: TLSContext?
        if let chain = options.tlsCertificateChain, let key = options.tlsPrivateKey {
            do {
                tls = try TLSContext(serverCertificateChain: chain, privateKey: key, clientCA: options.tlsClientCA)
            } catch {
                throw ConfigurationError(field: "tls", message: error.description)
            }
        }
        let fd = try socketAddress.withSockAddrForListening { cr_socket_listen($0, $1, 1024) }
        if fd < 0 { throw ReactorError(operation: "listen on \(socketAddress)", errno: -fd) }
        let bound = Int(cr_socket_local_port(fd))
        self.port = max(bound, 0)
        self.address = unixPath != nil ? host : host.contains(":") ? "[\(host)]:\(self.port)" : "\(host):\(self.port)"
        self.listener = EchoListener(
            reactor: loop.reactor, fd: fd, options: options, tls: tls, ownsLoop: eventLoop == nil ? loop : nil)
        self.listener.socketFile = unixPath.map(SocketFile.init(path:))
        let listener = self.listener
        if loop.reactor.inReactorThread {
            listener.start()
        } else {
            loop.reactor.execute { listener.start() }
        }
    }

    /// Stops listening and closes every connection (open streams are reset). Waits until that is done when called
    /// off the loop thread; stops the loop too if the server created it.
    public func close() {
        let listener = self.listener
        if self.reactor.inReactorThread {
            listener.shutdown()
            return
        }
        let done = Atomic<Bool>(false)
        let accepted = self.reactor.execute {
            listener.shutdown()
            done.store(true, ordering: .releasing)
        }
        while accepted && !done.load(ordering: .acquiring) && !self.reactor.isStopping {
            usleep(1000)
        }
        if let loop = listener.ownsLoop { loop.shutdown() }
    }

    /// Stops listening and sends GOAWAY to every client, lets the streams under way finish, and closes what is left
    /// after `gracePeriod` (or once `hurry()` returns true, checked as it waits) as `close()` does. Waits; call it
    /// off the loop thread. A client's calls that started before the GOAWAY end as the server answers them; later
    /// ones go elsewhere (or wait for a server to come back).
    public func close(gracePeriod: Duration, hurry: () -> Bool = { false }) {
        let listener = self.listener
        guard self.reactor.execute({ listener.drain() }) else { return self.close() }
        let deadline = ContinuousClock.now + gracePeriod
        while ContinuousClock.now < deadline && !hurry() {
            guard let open = self.answerFromLoop({ $0.connections.count }), open > 0 else { break }
            usleep(10_000)
        }
        self.close()
    }

    /// Sends GOAWAY to every connected client; each connection closes once its open streams finish. The server
    /// keeps accepting new connections (as a server that recycles connections does).
    public func goAway() {
        let listener = self.listener
        self.reactor.execute { listener.goAway() }
    }

    /// Requests per connection the server accepted, in the order they were accepted (connections that carried no
    /// request are left out). Waits for the answer from the server's loop; call it off that loop.
    public func requestsPerConnection() -> [Int] {
        self.answerFromLoop { listener in listener.requestsByConnection.sorted { $0.key < $1.key }.map(\.value) } ?? []
    }

    /// How many requests carrying `x-request-key: key` reached the server (their headers arrived), counting every
    /// attempt. Waits for the answer from the server's loop; call it off that loop.
    public func requestCount(key: String) -> Int {
        self.answerFromLoop { listener in listener.requestsByKey[key, default: 0] } ?? 0
    }

    /// Tests: asks every TLS client for a TLS 1.3 key update that requests one back (RFC 8446 §4.6.3). Returns how
    /// many connections were asked. Waits for the server's loop; call it off that loop.
    package func requestKeyUpdates() -> Int {
        self.answerFromLoop { listener in listener.connections.values.filter { $0.requestKeyUpdate() }.count } ?? 0
    }

    /// Tests: how many times a stream stopped taking requests because its responses waited for the client, and the
    /// most response bytes any stream had waiting.
    package func responseBackpressure() -> (holds: Int, mostPending: Int) {
        self.answerFromLoop { ($0.responseHolds, $0.mostPendingResponseBytes) } ?? (0, 0)
    }

    /// Tests: KeyUpdates the clients sent back since `requestKeyUpdates()`, over every connection.
    package func clientKeyUpdates() -> Int {
        self.answerFromLoop { listener in listener.connections.values.reduce(0) { $0 + $1.clientKeyUpdates } } ?? 0
    }

    /// Runs `body` on the server's loop and waits for its answer; nil once the loop has stopped.
    private func answerFromLoop<Answer: Sendable>(_ body: @escaping @Sendable (EchoListener) -> Answer) -> Answer? {
        let listener = self.listener
        let result = PThreadLock<Answer?>(nil)
        guard self.reactor.execute({
            let answer = body(listener)
            result.withLock { $0 = answer }
        }) else { return nil }
        while true {
            if let value = result.withLock({ $0 }) { return value }
            usleep(200)
        }
    }
}


/// The listening socket: accepts connections and owns them. Reactor thread only.
final class EchoListener: ReactorHandler, @unchecked Sendable {
    unowned let reactor: Reactor
    let options: EchoServer.Options
    let tls: TLSContext?
    let ownsLoop: ReactorLoop?
    private var fd: Int32
    private var registration: Reactor.Registration?
    private(set) var connections: [ObjectIdentifier: EchoServerConnection] = [:]
    private var closed = false
    /// Attempts seen per `x-request-key`, for `x-fail-first`.
    var attempts: [String: Int] = [:]
    /// Requests whose headers arrived, per `x-request-key` (what a test asks `requestCount(key:)`).
    var requestsByKey: [String: Int] = [:]
    /// Requests whose headers arrived, per connection serial.
    var requestsByConnection: [Int: Int] = [:]
    /// Tests (`responseBackpressure()`).
    var responseHolds = 0
    var mostPendingResponseBytes = 0
    private var connectionSerials = 0

    /// Counts one more attempt under `key`; returns how many were counted before it.
    func countAttempt(_ key: String) -> Int {
        let seen = self.attempts[key, default: 0]
        self.attempts[key] = seen + 1
        return seen
    }

    /// The Unix socket's file, removed when the server stops listening.
    var socketFile: SocketFile?

    init(reactor: Reactor, fd: Int32, options: EchoServer.Options, tls: TLSContext?, ownsLoop: ReactorLoop?) {
        self.tls = tls
        self.reactor = reactor
        self.fd = fd
        self.options = options
        self.ownsLoop = ownsLoop
    }

    func start() {
        guard !self.closed else { return }
        self.registration = try? self.reactor.register(fd: self.fd, interest: Reactor.Events.read, handler: self)
        self.reactor.addShutdownHook(self)
    }

    /// Out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the pending connection stays queued, so the listening
    /// socket stays readable, and a level-triggered loop would call again at once, spinning a core until an fd is
    /// freed. Accepting pauses instead, 5 ms at first, doubling up to 1 s (what Go's net/http does), and resumes on
    /// a timer; an accept that succeeds resets the pause.
    private var acceptPauseNanoseconds: UInt64 = 0
    private var acceptResumeTimer: Reactor.TimerID = 0

    override func reactorFDReady(_ events: UInt32) {
        for _ in 0..<64 {
            let client = cr_socket_accept(self.fd)
            if client < 0 {
                if client == -EMFILE || client == -ENFILE || client == -ENOBUFS || client == -ENOMEM {
                    self.pauseAccepting()
                }
                return  // EAGAIN, or another transient accept error (ECONNABORTED): try again next turn
            }
            self.acceptPauseNanoseconds = 0
            self.connectionSerials += 1
            let connection = EchoServerConnection(
                reactor: self.reactor, fd: client, listener: self, serial: self.connectionSerials)
            self.connections[ObjectIdentifier(connection)] = connection
            connection.start()
        }
    }

    private func pauseAccepting() {
        guard let registration = self.registration else { return }
        self.acceptPauseNanoseconds = min(max(self.acceptPauseNanoseconds * 2, 5_000_000), 1_000_000_000)
        self.reactor.setInterest(registration, 0)
        self.acceptResumeTimer = self.reactor.scheduleTimer(
            at: self.reactor.now &+ self.acceptPauseNanoseconds, handler: self)
    }

    override func reactorTimerFired(tag: UInt64) {
        self.acceptResumeTimer = 0
        if let registration = self.registration { self.reactor.setInterest(registration, Reactor.Events.read) }
    }

    func connectionClosed(_ connection: EchoServerConnection) {
        self.connections.removeValue(forKey: ObjectIdentifier(connection))
    }

    func goAway() {
        for connection in self.connections.values { connection.goAway() }
    }

    /// The start of a graceful close: no new connection, GOAWAY to the others.
    func drain() {
        guard !self.closed else { return }
        self.stopListening()
        self.goAway()
    }

    private func stopListening() {
        self.reactor.cancelTimer(self.acceptResumeTimer)
        self.acceptResumeTimer = 0
        if let registration = self.registration {
            self.reactor.deregister(registration, handler: self)
            self.registration = nil
        }
        if self.fd >= 0 {
            _ = cr_close(self.fd)
            self.fd = -1
            self.socketFile?.remove()
        }
    }

    func shutdown() {
        guard !self.closed else { return }
        self.closed = true
        self.stopListening()
        self.reactor.removeShutdownHook(self)
        for connection in Array(self.connections.values) { connection.close() }
        self.connections.removeAll()
    }

    /// The reactor is stopping.
    override func reactorRunSubmitted() {
        self.shutdown()
    }
}

/// A listening Unix socket's file, known by its inode so that stopping removes that file and not another one made at
/// the same path since (by a server started after this one was given up for dead).
struct SocketFile {
    let path: String
    private let identity: (device: UInt64, inode: UInt64)?

    init(path: String) {
        self.path = path
        self.identity = Self.identity(of: path)
    }

    func remove() {
        if let identity = self.identity, let now = Self.identity(of: self.path), now == identity { unlink(self.path) }
    }

    private static func identity(of path: String) -> (device: UInt64, inode: UInt64)? {
        var info = stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return nil }
        return (UInt64(info.st_dev), UInt64(info.st_ino))
    }
}

extension NetworkAddress {
    func withSockAddrForListening(_ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) throws -> Int32 {
        try self.withSockAddr { body($0, $1) }
    }
}
