// Everyday code that imports GRPCCore (for its generated clients), SwiftNIO's NIOCore and this package side by side,
// writing every type name unqualified: it compiles only while no public name of ours is one of theirs (Status,
// Metadata, CallOptions, RPCError, RetryPolicy, CompressionAlgorithm, HedgingPolicy; EventLoop, SocketAddress,
// ByteBuffer, ...). No `@testable` import here: only what a user sees.
import GRPCConnectionManager
import GRPCCore
import GRPCEchoServer
import NIOCore
import Testing

@Suite("Public names coexist with GRPCCore's and NIOCore's")
struct CoexistenceTests {
    @Test("a file importing both writes every name unqualified, and the throwing API reads like grpc-swift's")
    func bothImportedUnqualified() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let server = try EchoServer(eventLoop: loop)
        defer { server.close() }
        let channel = try GRPCChannel(target: server.address, eventLoop: loop)

        // Ours.
        var metadata: CallMetadata = ["x-tenant": "blue"]
        metadata.add("x-request-id", "42")
        let options = RequestOptions(timeout: .seconds(5))
        let response = try await channel.unary(path: "/test.Raw/Get", request: [1, 2], metadata: metadata, options: options)
        #expect(response.message == [1, 2])
        #expect(response.initialMetadata["x-tenant"] == "blue")
        do {
            _ = try await channel.unary(
                path: "/test.Raw/Get", request: [], metadata: ["x-fail-code": "5", "x-fail-message": "gone"],
                options: options)
            Issue.record("a NOT_FOUND call must throw")
        } catch {
            let status: CallStatus = error.status  // typed throws: `error` is a CallError
            #expect(status.code == .notFound)
            #expect(status.message == "gone")
        }
        var retry = CallRetryPolicy()
        retry.maxAttempts = 2
        #expect(retry.maxAttempts == 2)
        let compressed = RequestOptions(timeout: .seconds(5), compression: CallCompression.gzip)
        #expect(compressed.compression == .gzip)
        let hedging = CallHedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50))
        #expect(hedging.maxAttempts == 2)
        #expect(TLSSettings().verifyCertificate)
        #expect(NetworkAddress(ip: "127.0.0.1", port: 1) != nil)

        // GRPCCore's, in the same file, unqualified.
        let coreStatus = Status(code: .notFound, message: "gone")
        var coreMetadata = Metadata()
        coreMetadata.addString("blue", forKey: "x-tenant")
        var coreOptions = CallOptions.defaults
        coreOptions.timeout = .seconds(5)
        let coreError = RPCError(code: .notFound, message: "gone")
        let corePolicy = RetryPolicy(
            maxAttempts: 2, initialBackoff: .milliseconds(10), maxBackoff: .seconds(1), backoffMultiplier: 2,
            retryableStatusCodes: [.unavailable])
        let coreCompression: CompressionAlgorithm = .gzip
        let coreHedging = HedgingPolicy(maxAttempts: 2, hedgingDelay: .milliseconds(50), nonFatalStatusCodes: [])
        #expect(coreCompression == .gzip && coreHedging.maxAttempts == 2)
        #expect(coreStatus.code == .notFound && coreError.code == .notFound)
        #expect(coreMetadata.count == 1 && coreOptions.timeout == .seconds(5) && corePolicy.maxAttempts == 2)

        // NIOCore's, unqualified too.
        let nioAddress = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
        var buffer = ByteBuffer()
        buffer.writeBytes(response.message)
        let amount = TimeAmount.milliseconds(5)
        let noLoop: (any EventLoop)? = nil
        #expect(nioAddress.port == 1 && buffer.readableBytes == 2 && amount.nanoseconds == 5_000_000 && noLoop == nil)
    }
}
