import Foundation
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// Records completions and flags any call that completes more than once.
final class CompletionLedger: Sendable {
    private let state = PThreadLock<(counts: [Int: Int], duplicates: Int)>(([:], 0))

    func record(_ id: Int) {
        self.state.withLock { state in
            state.counts[id, default: 0] += 1
            if state.counts[id]! > 1 { state.duplicates += 1 }
        }
    }

    var duplicates: Int { self.state.withLock { $0.duplicates } }
    var completed: Int { self.state.withLock { $0.counts.count } }
}

extension GRPCChannel {
    /// The callback API wrapped for tests, recording each completion in `ledger`.
    func call(
        _ path: String = "/echo.Echo/Get", _ request: [UInt8] = [], metadata: CallMetadata = [:],
        timeout: Duration? = nil, ledger: CompletionLedger? = nil, id: Int = 0
    ) async -> UnaryResponse {
        await withCheckedContinuation { continuation in
            self.unary(path: path, request: request, metadata: metadata, options: RequestOptions(timeout: timeout)) {
                response in
                ledger?.record(id)
                continuation.resume(returning: response)
            }
        }
    }
}

extension GRPCChannel {
    /// `/echo.Echo/Get` with `request`.
    func call(
        _ request: [UInt8], metadata: CallMetadata = [:], timeout: Duration? = nil, ledger: CompletionLedger? = nil,
        id: Int = 0
    ) async -> UnaryResponse {
        await self.call("/echo.Echo/Get", request, metadata: metadata, timeout: timeout, ledger: ledger, id: id)
    }
}

/// A loop plus an echo server on it; `shutdown()` closes both and waits.
final class LoopbackFixture: Sendable {
    let loop: ReactorLoop
    let server: EchoServer
    var target: String { self.server.address }

    init(options: EchoServer.Options = EchoServer.Options()) throws {
        self.loop = try ReactorLoop()
        self.loop.start()
        self.server = try EchoServer(options: options, eventLoop: self.loop)
    }

    func channel(_ configuration: Configuration = .defaults) throws -> GRPCChannel {
        try GRPCChannel(target: self.target, configuration: configuration, eventLoop: self.loop)
    }

    func shutdown() {
        self.server.close()
        self.loop.shutdown()
    }
}

/// Writes `messages` on a new bidirectional stream of `path` (closing the requests after the last) while reading
/// every response; returns the responses and how the stream ended.
func echoed(
    _ messages: [[UInt8]], on channel: GRPCChannel, path: String = "/test.Stream/Update"
) async throws -> (responses: [[UInt8]], status: CallStatus) {
    let call = channel.bidirectionalStreaming(path: path)
    let writer = Task {
        for message in messages { try await call.write(message) }
        call.closeSend()
    }
    var received: [[UInt8]] = []
    for try await message in call.responses { received.append(message) }
    try await writer.value
    return (received, await call.result().status)
}

/// Monotonic seconds.
func now() -> Double {
    Double(Reactor.clock()) / 1e9
}

/// Open file descriptors of this process.
func openFDCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}

/// Records events from a bus (handlers run on the reactor thread).
final class EventRecorder: Sendable {
    private let events = PThreadLock<[ConnectionEvent]>([])

    func record(_ event: ConnectionEvent) { self.events.withLock { $0.append(event) } }

    var all: [ConnectionEvent] { self.events.withLock { $0 } }

    /// State transitions as "FROM>TO".
    var transitions: [String] {
        self.all.compactMap {
            if case .connectivityStateChanged(_, _, let from, let to, _) = $0 { return "\(from)>\(to)" }
            return nil
        }
    }

    /// A compact story of connection events: "start", "fail", "ok", "STATE>STATE", "goaway", "keepalive".
    var story: [String] {
        self.all.compactMap { event in
            switch event {
            case .connectAttemptStarted: return "start"
            case .connectAttemptFailed: return "fail"
            case .connectAttemptSucceeded: return "ok"
            case .connectivityStateChanged(_, _, let from, let to, _): return "\(from)>\(to)"
            case .goAwayReceived: return "goaway"
            case .keepaliveTimeout: return "keepalive"
            case .healthCheckUnimplemented: return "health-unimplemented"
            case .tlsFilesRefused: return "tls-refused"
            case .retryScheduled: return "retry"
            case .circuitBreakerStateChanged(_, _, let from, let to): return "breaker:\(from)>\(to)"
            case .callStarted, .callFinished, .attemptFinished, .addressesResolved, .resolutionFailed: return nil
            }
        }
    }

    func count(where predicate: (ConnectionEvent) -> Bool) -> Int { self.all.filter(predicate).count }
}

/// A connected pair of Unix stream sockets (the caller closes both), or nil.
///
/// Here, in a file that does not import CReactor: a file that does, and names `SOCK_STREAM`, makes the compiler
/// take the constant as CReactor's (its header includes sys/socket.h), and every file without that import then
/// cannot find it.
func streamSocketPair() -> (Int32, Int32)? {
    var pair: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0 else { return nil }
    return (pair[0], pair[1])
}

/// A blocking TCP connection to 127.0.0.1:`port` (the caller closes it), or nil when nothing accepts there.
func loopbackConnection(port: Int) -> Int32? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return nil }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    address.sin_port = UInt16(port).bigEndian
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else {
        close(fd)
        return nil
    }
    return fd
}

/// A nonblocking TCP socket bound to a free loopback port and connecting to that same port, which nobody listens
/// on: the kernel connects it to itself (TCP's simultaneous open), as a client's connect does when the ephemeral
/// port it is given is the one it dials. The caller closes it. Nil when the set-up fails.
func selfConnectingSocket() -> Int32? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
    guard fd >= 0 else { return nil }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let connecting = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
            bind(fd, address, length) == 0 && getsockname(fd, address, &length) == 0
                && (connect(fd, address, length) == 0 || errno == EINPROGRESS)
        }
    }
    guard connecting else {
        close(fd)
        return nil
    }
    return fd
}

/// A blocking Unix stream socket for `path`, for a peer a test sets up by hand (a listener that never accepts, a
/// socket left behind by a server that died). The caller closes `fd`.
struct UnixSocket {
    let fd: Int32
    private var address = sockaddr_un()

    init(_ path: String) {
        self.fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        self.address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &self.address.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
        }
    }

    /// bind(2) to the path: 0, or -1 with errno.
    func bind() -> Int32 { self.withAddress { Glibc.bind(self.fd, $0, $1) } }

    /// connect(2) to the path: 0, or -1 with errno.
    func connect() -> Int32 { self.withAddress { Glibc.connect(self.fd, $0, $1) } }

    private func withAddress(_ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
        withUnsafePointer(to: self.address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}

/// A port that was free a moment ago (bound, read, closed).
func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer -> Int32 in
            _ = bind(fd, pointer, length)
            return getsockname(fd, pointer, &length)
        }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Polls `condition` every 10 ms until it holds or `timeout` seconds pass.
func eventually(timeout: Double = 5, _ condition: () async -> Bool) async -> Bool {
    let end = now() + timeout
    while now() < end {
        if await condition() { return true }
        try? await Task.sleep(nanoseconds: 10_000_000)
    }
    return await condition()
}

extension GRPCChannel {
    /// Connects now and waits (up to 10 s) until the channel is READY. For tests whose timers start with a call
    /// (hedging delays, per-attempt timeouts): connecting, which a loaded machine stretches, is then not inside them.
    func ready() async -> Bool {
        self.connect()
        return await eventually(timeout: 10) { await self.connectivity().state == .ready }
    }
}

/// The grpc-cm binary next to the test bundle (`swift build --build-tests` builds it).
func grpcCMBinary() -> String {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
    return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("grpc-cm").path
}

/// The tests write to their peers' stdin pipes: a peer that died must fail a test, not kill the runner with SIGPIPE
/// (the library leaves SIGPIPE as the application set it, as a library should). Called wherever a pipe is made.
func ignoreSIGPIPE() { _ = sigpipeIgnored }
private let sigpipeIgnored: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

/// Runs a program, returning its exit status and standard output (or, with `stderr`, its standard error followed by
/// anything on its standard output marked "STDOUT: ", which a `grpc_health_probe` never writes to).
func runProgram(_ path: String, _ arguments: [String], stderr: Bool = false) throws -> (status: Int32, output: String) {
    ignoreSIGPIPE()
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    let errors = stderr ? Pipe() : nil
    process.standardError = errors ?? FileHandle.nullDevice
    try process.run()
    // Standard error first: the outputs read here are small, far below a pipe's buffer, so neither side waits.
    let errorText = errors.map { String(decoding: readToEnd($0.fileHandleForReading.fileDescriptor), as: UTF8.self) }
    let data = readToEnd(pipe.fileHandleForReading.fileDescriptor)
    process.waitUntilExit()
    let output = String(decoding: data, as: UTF8.self)
    guard let errorText else { return (process.terminationStatus, output) }
    return (process.terminationStatus, errorText + (output.isEmpty ? "" : "STDOUT: " + output))
}

// Reading a child's output. Foundation's FileHandle traps when a read is interrupted by a signal (EINTR), and with
// many child processes (peers, examples, the CLI) signals do arrive: these retry instead.

/// Up to `count` bytes from `fd` (fewer when that is what is there); empty at end of file.
func readSome(_ fd: Int32, count: Int = 4096) -> [UInt8] {
    var buffer = [UInt8](repeating: 0, count: count)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, count) }
        if n >= 0 { return Array(buffer.prefix(n)) }
        if errno != EINTR { return [] }
    }
}

/// One line from `fd`, without its newline; nil at end of file before any byte.
func readLine(_ fd: Int32) -> String? {
    var line: [UInt8] = []
    while true {
        let byte = readSome(fd, count: 1)
        if byte.isEmpty { return line.isEmpty ? nil : String(decoding: line, as: UTF8.self) }
        if byte[0] == UInt8(ascii: "\n") { return String(decoding: line, as: UTF8.self) }
        line.append(byte[0])
    }
}

/// Everything until end of file.
func readToEnd(_ fd: Int32) -> [UInt8] {
    var all: [UInt8] = []
    while true {
        let chunk = readSome(fd)
        if chunk.isEmpty { return all }
        all.append(contentsOf: chunk)
    }
}
