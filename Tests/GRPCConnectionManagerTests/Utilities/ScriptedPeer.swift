import Foundation

@testable import GRPCCMReactor

/// An HTTP/2 server that misbehaves on purpose, frame by frame: `scripted_peer.py` beside this file (hyperframe and
/// hpack, from the h2 package that `make test` installs). See the script for the modes.
final class ScriptedPeer: @unchecked Sendable {
    // `@unchecked`: `process` and the pipes are set once in init; `lines` is behind its lock.
    let port: Int
    private let process: Process
    private let input: Pipe
    private let lines = PThreadLock<[String]>([])

    /// Starts the script in `mode` with `arguments`; with `tls`, over TLS (certificate chain and key, PEM).
    init(_ mode: String, _ arguments: [String] = [], tls: (certificate: String, key: String)? = nil) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("scripted_peer.py")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        var all = ["python3", script.path]
        if let tls { all += ["--tls", tls.certificate, tls.key] }
        process.arguments = all + [mode] + arguments
        let output = Pipe()
        let input = Pipe()
        process.standardOutput = output
        process.standardInput = input
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        self.input = input
        let handle = output.fileHandleForReading
        guard let first = Self.readLine(handle), let port = Int(first) else {
            process.terminate()
            throw PeerError.didNotStart
        }
        self.port = port
        let lines = self.lines
        Thread.detachNewThread {
            while let line = Self.readLine(handle) { lines.withLock { $0.append(line) } }
        }
    }

    enum PeerError: Error {
        case didNotStart
    }

    var target: String { "127.0.0.1:\(self.port)" }

    private static func readLine(_ handle: FileHandle) -> String? {
        GRPCConnectionManagerTests.readLine(handle.fileDescriptor)
    }

    /// The "event ..." lines so far, without the prefix.
    var events: [String] {
        self.lines.withLock { $0.filter { $0.hasPrefix("event ") }.map { String($0.dropFirst(6)) } }
    }

    /// Request header blocks the peer has received.
    func headerBlocks() -> Int {
        let before = self.lines.withLock { $0.count }
        self.input.fileHandleForWriting.write("count\n".data(using: .utf8)!)
        var answer: Int?
        for _ in 0..<500 {
            answer = self.lines.withLock { lines in
                lines.count > before ? lines[before...].compactMap { Int($0) }.first : nil
            }
            if answer != nil { break }
            usleep(2000)
        }
        return answer ?? -1
    }

    func stop() {
        try? self.input.fileHandleForWriting.close()
        for _ in 0..<200 where self.process.isRunning { usleep(5000) }
        if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) }
        self.process.waitUntilExit()
    }
}
