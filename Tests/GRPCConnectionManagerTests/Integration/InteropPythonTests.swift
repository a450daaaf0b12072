import Foundation
import Testing

@testable import GRPCConnectionManager
@testable import GRPCCMCalls
@testable import GRPCCMHandlers
@testable import GRPCCMPool
@testable import GRPCCMReactor
@testable import GRPCCMTransport
@testable import GRPCCMWire

/// The same calls against grpcio, the reference implementation.
@Suite("Interop with a Python grpcio server", .serialized)
struct InteropPythonTests {
    @Test("echo, status codes, metadata with -bin, deadline, health")
    func interop() async throws {
        let peer = try PythonPeer()
        defer { peer.stop() }
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let channel = try GRPCChannel(target: peer.target, eventLoop: loop)

        for size in [0, 1, 64 << 10, 1 << 20] {
            let request = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 13) }
            let response = await channel.call(request, timeout: .seconds(20))
            #expect(response.status == .ok, "size \(size)")
            #expect(response.message == request, "size \(size)")
        }

        for code in 1...16 {
            let message = "grpcio says \(code): ✗ ü"
            var metadata = CallMetadata()
            metadata.add("x-fail-code", String(code))
            metadata.add("x-fail-message", PercentEncoding.encode(message))
            let response = await channel.call(metadata: metadata, timeout: .seconds(5))
            #expect(response.status.code.rawValue == code)
            #expect(response.status.message == message)
        }

        var metadata = CallMetadata()
        metadata.add("x-text", "plain")
        metadata.add("x-blob-bin", binary: [0, 0xFE, 0xFF, 1])
        let echoed = await channel.call([1], metadata: metadata, timeout: .seconds(5))
        #expect(echoed.status == .ok)
        #expect(echoed.initialMetadata["x-text"] == "plain")
        #expect(echoed.initialMetadata.values(for: "x-blob-bin") == [.binary([0, 0xFE, 0xFF, 1])])

        let started = now()
        // Not the server's 10 s: the deadline's 200 ms, with room for a loaded machine.
        let late = await channel.call(metadata: ["x-sleep-ms": "10000"], timeout: .milliseconds(200))
        #expect(late.status.code == .deadlineExceeded)
        #expect(now() - started < 3)

        let health = await channel.call("/grpc.health.v1.Health/Check", [], timeout: .seconds(5))
        #expect(health.status == .ok)
        #expect(health.message == [0x08, 0x01])
        let unknown = await channel.call(
            "/grpc.health.v1.Health/Check", [0x0A, 0x03] + Array("nop".utf8), timeout: .seconds(5))
        #expect(unknown.status.code == .notFound)
        let unimplemented = await channel.call("/grpc.health.v1.Health/Nope", [], timeout: .seconds(5))
        #expect(unimplemented.status.code == .unimplemented)
    }
}
