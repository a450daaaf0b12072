import Foundation
import Testing

/// The embedding examples as a user runs them (`swift build --build-tests` builds them next to the tests).
@Suite("Examples", .serialized)
struct ExamplesTests {
    static func binary(_ name: String) -> String {
        URL(fileURLWithPath: grpcCMBinary()).deletingLastPathComponent().appendingPathComponent(name).path
    }

    @Test("embedding-example without arguments: calls from callbacks, its own /metrics fetched over TCP, exit 0")
    func embedding() throws {
        let (status, output) = try runProgram(Self.binary("embedding-example"), [])
        #expect(status == 0, "\(output)")
        #expect(output.contains("embedding_calls_total{outcome=\"ok\"} 50"))
        #expect(output.contains("GET /healthz ->\nHTTP/1.1 200 OK"))
    }

    @Test("embedding-example --serve shuts down cleanly on SIGTERM")
    func embeddingStopsOnSIGTERM() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.binary("embedding-example"))
        process.arguments = ["--serve"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        // A hung example must fail this test, not hang the suite: kill it after 30 s whatever it is doing.
        let pid = process.processIdentifier
        let watchdog = Thread { sleep(30); kill(pid, SIGKILL) }
        watchdog.start()
        // Wait until it serves, then ask it to stop the way a service manager would.
        let handle = pipe.fileHandleForReading
        var seen = ""
        while !seen.contains("serving http://") {
            let chunk = readSome(handle.fileDescriptor)
            if chunk.isEmpty { break }
            seen += String(decoding: chunk, as: UTF8.self)
        }
        #expect(seen.contains("serving http://"), "\(seen)")
        // The example installs its handlers before it prints that line, so the signal may follow at once.
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        seen += String(decoding: readToEnd(handle.fileDescriptor), as: UTF8.self)
        #expect(process.terminationReason == .exit && process.terminationStatus == 0, "\(seen)")
        #expect(seen.contains("shutting down"))
    }

    @Test("foreign-loop-example: a host epoll loop drives ours to 20 completed calls")
    func foreignLoop() throws {
        let (status, output) = try runProgram(Self.binary("foreign-loop-example"), [])
        #expect(status == 0, "\(output)")
        #expect(output.contains("20 of 20 calls OK"))
    }
}
