import Foundation

/// Debian's etcd-server on loopback, one member, data in a temporary directory (`make test` installs it).
final class EtcdPeer: @unchecked Sendable {
    // `@unchecked`: set in init, and by `restart()` (called by one test at a time, never concurrently with itself).
    let port: Int
    private var process: Process
    private let arguments: [String]
    private let dataDirectory: String

    enum EtcdError: Error {
        case didNotStart(String)
    }

    init() throws {
        let port = freePort()
        let peerPort = freePort()
        let directory = NSTemporaryDirectory() + "grpc-cm-etcd-\(getpid())-\(port)"
        self.arguments = [
            "etcd", "--name", "test", "--data-dir", directory, "--log-level", "error",
            "--listen-client-urls", "http://127.0.0.1:\(port)", "--advertise-client-urls", "http://127.0.0.1:\(port)",
            "--listen-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-cluster", "test=http://127.0.0.1:\(peerPort)",
        ]
        self.port = port
        self.dataDirectory = directory
        self.process = try Self.launch(self.arguments, port: port)
    }

    /// Starts etcd and returns once its client port accepts.
    private static func launch(_ arguments: [String], port: Int) throws -> Process {
        let process = try spawnQuietly(arguments)
        for _ in 0..<1000 {
            if Self.accepts(port) { return process }
            if !process.isRunning { break }
            usleep(10_000)
        }
        process.terminate()
        throw EtcdError.didNotStart("etcd did not listen on \(port) (is etcd-server installed?)")
    }

    /// Stops etcd and starts it again on the same ports with the same data (keys and leases survive).
    func restart() throws {
        self.halt()
        try self.resume()
    }

    /// Stops etcd, its data kept for `resume()`.
    func halt() {
        self.process.terminate()
        self.process.waitUntilExit()
    }

    /// Starts etcd again after `halt()`; returns once its client port accepts.
    func resume() throws {
        self.process = try Self.launch(self.arguments, port: self.port)
    }

    /// Stops etcd, deletes its data and starts a fresh one on the same ports: its revision is back at 1, as a member
    /// wiped (or a cluster restored from an old snapshot) would be.
    func wipe() throws {
        self.process.terminate()
        self.process.waitUntilExit()
        try? FileManager.default.removeItem(atPath: self.dataDirectory)
        self.process = try Self.launch(self.arguments, port: self.port)
    }

    /// etcd's count of messages received on `method`'s streams since it started (its `/metrics`), e.g.
    /// "LeaseKeepAlive".
    func messagesReceived(_ method: String) -> Int? {
        self.metric(startingWith: "grpc_server_msg_received_total{grpc_method=\"\(method)\",")
    }

    /// The watchers etcd has now, on every stream (its `etcd_debugging_mvcc_watcher_total` gauge).
    var watchers: Int? { self.metric(startingWith: "etcd_debugging_mvcc_watcher_total ") }

    private func metric(startingWith prefix: String) -> Int? { Self.metric(port: self.port, startingWith: prefix) }

    /// The value of the first line of `/metrics` of the etcd on `port` that starts with `prefix`.
    static func metric(port: Int, startingWith prefix: String) -> Int? {
        guard let line = Self.metricLines(port: port)?.first(where: { $0.hasPrefix(prefix) }) else { return nil }
        return Self.value(line)
    }

    /// The lines of etcd's `/metrics` on `port`.
    private static func metricLines(port: Int) -> [Substring]? {
        guard let fd = loopbackConnection(port: port) else { return nil }
        defer { close(fd) }
        // A port that accepts but never answers (a stopped etcd, another process on a port etcd let go of) must
        // fail the read, not hang the test.
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request = Array("GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)
        guard request.withUnsafeMutableBytes({ write(fd, $0.baseAddress, $0.count) }) == request.count else { return nil }
        return String(decoding: readToEnd(fd), as: UTF8.self).split(separator: "\n")
    }

    private static func value(_ line: Substring) -> Int? {
        line.split(separator: " ").last.flatMap { Double($0) }.map { Int($0) }
    }

    /// How many of `method`'s streams are open on etcd now: those started, less those that ended (with any code:
    /// `grpc_server_handled_total{grpc_code="…",grpc_method="…",…}`).
    func openStreams(_ method: String) -> Int? {
        guard let lines = Self.metricLines(port: self.port) else { return nil }
        let label = "grpc_method=\"\(method)\""
        let started = lines.filter { $0.hasPrefix("grpc_server_started_total{") && $0.contains(label) }
        let ended = lines.filter { $0.hasPrefix("grpc_server_handled_total{") && $0.contains(label) }
        guard !started.isEmpty else { return nil }
        return started.compactMap(Self.value).reduce(0, +) - ended.compactMap(Self.value).reduce(0, +)
    }

    var endpoint: String { "127.0.0.1:\(self.port)" }

    /// The etcd process (to stop and continue it).
    var pid: pid_t { self.process.processIdentifier }

    static func accepts(_ port: Int) -> Bool {
        guard let fd = loopbackConnection(port: port) else { return false }
        close(fd)
        return true
    }

    func stop() {
        if self.process.isRunning {
            self.process.terminate()
            self.process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: self.dataDirectory)
    }
}

/// Runs `arguments` (a program found on PATH, then its arguments) with its output discarded.
private func spawnQuietly(_ arguments: [String]) throws -> Process {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    try process.run()
    return process
}

/// A real three-member etcd cluster on loopback (Raft between them), whose members a test stops and starts again:
/// the member in use going away, and quorum lost and regained. Elections are fast (50 ms heartbeats, 500 ms election
/// timeout) so that a test waits seconds, not tens of them.
final class EtcdCluster: @unchecked Sendable {
    // `@unchecked`: `processes` is changed by `stop(_:)` and `start(_:)`, called by one test, never concurrently.
    let ports: [Int]
    private var processes: [Process?]
    private let arguments: [[String]]
    private let directories: [String]

    init() throws {
        let ports = (0..<3).map { _ in freePort() }
        let peerPorts = (0..<3).map { _ in freePort() }
        let cluster = (0..<3).map { "m\($0)=http://127.0.0.1:\(peerPorts[$0])" }.joined(separator: ",")
        let token = "grpc-cm-\(getpid())-\(ports[0])"
        let directories = ports.map { NSTemporaryDirectory() + "grpc-cm-etcd-cluster-\(getpid())-\($0)" }
        self.directories = directories
        self.arguments = (0..<3).map { index in
            [
                "etcd", "--name", "m\(index)", "--data-dir", directories[index],
                "--log-level", "error", "--heartbeat-interval", "50", "--election-timeout", "500",
                "--listen-client-urls", "http://127.0.0.1:\(ports[index])",
                "--advertise-client-urls", "http://127.0.0.1:\(ports[index])",
                "--listen-peer-urls", "http://127.0.0.1:\(peerPorts[index])",
                "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPorts[index])",
                "--initial-cluster", cluster, "--initial-cluster-token", token, "--initial-cluster-state", "new",
            ]
        }
        self.ports = ports
        self.processes = [nil, nil, nil]
        // All three at once: a member's client port opens only once the cluster has formed.
        for index in 0..<3 { self.processes[index] = try spawnQuietly(self.arguments[index]) }
        for index in 0..<3 { try self.waitUntilListening(index) }
    }

    var endpoints: [String] { self.ports.map { "127.0.0.1:\($0)" } }

    /// Stops member `index` (its data stays: `start` brings it back with it).
    func stop(_ index: Int) {
        guard let process = self.processes[index] else { return }
        process.terminate()
        process.waitUntilExit()
        self.processes[index] = nil
    }

    /// Starts member `index` again, with its data; returns once its client port accepts.
    func start(_ index: Int) throws {
        guard self.processes[index] == nil else { return }
        self.processes[index] = try spawnQuietly(self.arguments[index])
        try self.waitUntilListening(index)
    }

    /// Member `index`'s count of messages received on `method`'s streams (`EtcdPeer.messagesReceived`). Not for a
    /// member stopped with SIGSTOP: its port accepts, and the read would wait for ever.
    func messagesReceived(_ index: Int, _ method: String) -> Int? {
        EtcdPeer.metric(port: self.ports[index], startingWith: "grpc_server_msg_received_total{grpc_method=\"\(method)\",")
    }

    /// Member `index`'s process (to stop and continue it), while it runs.
    func pid(_ index: Int) -> pid_t? { self.processes[index]?.processIdentifier }

    func stopAll() {
        for index in 0..<3 { self.stop(index) }
        for directory in self.directories { try? FileManager.default.removeItem(atPath: directory) }
    }

    private func waitUntilListening(_ index: Int) throws {
        for _ in 0..<2000 {
            if EtcdPeer.accepts(self.ports[index]) { return }
            if self.processes[index]?.isRunning != true { break }
            usleep(10_000)
        }
        throw EtcdPeer.EtcdError.didNotStart("etcd member m\(index) did not listen on \(self.ports[index])")
    }
}
