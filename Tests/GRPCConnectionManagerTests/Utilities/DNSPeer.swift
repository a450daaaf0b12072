import Foundation

@testable import GRPCCMReactor

/// A DNS server on loopback whose answers a test changes (`dns_server.py` beside this file): for the c-ares resolver.
final class DNSPeer: @unchecked Sendable {
    // `@unchecked`: `process` and the pipes are set once in init; `lines` is behind its lock.
    let port: Int
    private let process: Process
    private let input: Pipe
    private let lines = PThreadLock<[String]>([])

    init() throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("dns_server.py")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script.path]
        let output = Pipe()
        let input = Pipe()
        process.standardOutput = output
        process.standardInput = input
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        self.input = input
        let fd = output.fileHandleForReading.fileDescriptor
        guard let first = readLine(fd), let port = Int(first) else {
            process.terminate()
            throw ScriptedPeer.PeerError.didNotStart
        }
        self.port = port
        let lines = self.lines
        Thread.detachNewThread {
            while let line = readLine(fd) { lines.withLock { $0.append(line) } }
        }
    }

    /// `127.0.0.1:port`, for `Configuration.dns.servers`.
    var server: String { "127.0.0.1:\(self.port)" }

    /// Answers `name` with `addresses` from now on (A for IPv4, AAAA for IPv6); returns once the server does.
    func set(_ name: String, _ addresses: [String]) { self.change("set \(name) \(addresses.joined(separator: ","))") }
    /// Answers `name` with no address.
    func empty(_ name: String) { self.change("empty \(name)") }
    /// Never answers `name`.
    func silence(_ name: String) { self.change("silent \(name)") }

    /// Sends a change and waits for the server's "ok" (the next query sees it).
    private func change(_ line: String) {
        let before = self.lines.withLock { $0.count }
        self.send(line)
        for _ in 0..<500 {
            if self.lines.withLock({ $0.dropFirst(before).contains("ok") }) { return }
            usleep(10_000)
        }
    }

    /// Queries received so far.
    func queries() -> Int {
        let before = self.lines.withLock { $0.count }
        self.send("count")
        for _ in 0..<500 {
            if let line = self.lines.withLock({ $0.count > before ? $0.last : nil }), line.hasPrefix("count ") {
                return Int(line.dropFirst(6)) ?? -1
            }
            usleep(10_000)
        }
        return -1
    }

    private func send(_ line: String) {
        self.input.fileHandleForWriting.write((line + "\n").data(using: .utf8)!)
    }

    func stop() {
        try? self.input.fileHandleForWriting.close()
        self.process.waitUntilExit()
    }
}
