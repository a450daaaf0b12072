import Foundation

@testable import GRPCCMReactor

/// A Python script beside this file run as a peer: it prints its port first, then lines (events, answers) that are
/// kept; commands go to its stdin, and it exits when stdin closes. `ScriptedPeer` and `DNSPeer` are made of one.
final class ScriptProcess: @unchecked Sendable {
    // `@unchecked`: `process` and the pipes are set once in init; `lines` is behind its lock.
    let port: Int
    private let process: Process
    private let input: Pipe
    private let lines = PThreadLock<[String]>([])
    /// Signalled once the reader has read the script's last line (end of its output).
    private let outputEnded = DispatchSemaphore(value: 0)
    private let stopped = PThreadLock<Bool>(false)

    enum ScriptError: Error {
        case didNotStart
    }

    init(_ script: String, _ arguments: [String]) throws {
        ignoreSIGPIPE()
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(script)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", path.path] + arguments
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
            throw ScriptError.didNotStart
        }
        self.port = port
        let lines = self.lines
        let outputEnded = self.outputEnded
        Thread.detachNewThread {
            while let line = readLine(fd) { lines.withLock { $0.append(line) } }
            outputEnded.signal()
        }
    }

    /// Every line printed after the port, so far.
    var output: [String] { self.lines.withLock { $0 } }

    /// Sends `command`, then waits (up to 5 s) for a line after it that `answer` accepts.
    func ask<T>(_ command: String, _ answer: (String) -> T?) -> T? {
        let before = self.lines.withLock { $0.count }
        self.input.fileHandleForWriting.write((command + "\n").data(using: .utf8)!)
        for _ in 0..<2500 {
            if let found = self.lines.withLock({ $0.dropFirst(before).lazy.compactMap(answer).first }) { return found }
            usleep(2000)
        }
        return nil
    }

    /// Whether `stop()` has been called: the script takes no more commands.
    var isStopped: Bool { self.stopped.withLock { $0 } }

    /// Closes stdin (the script exits), killing it if it lingers, then waits for the reader to have kept every line
    /// the script printed, so that `output` after `stop()` is complete.
    func stop() {
        let first = self.stopped.withLock { stopped in
            defer { stopped = true }
            return !stopped
        }
        guard first else { return }
        try? self.input.fileHandleForWriting.close()
        for _ in 0..<200 where self.process.isRunning { usleep(5000) }
        if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) }
        self.process.waitUntilExit()
        _ = self.outputEnded.wait(timeout: .now() + 5)
    }
}
