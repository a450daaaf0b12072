import Foundation
import GRPCEchoServer
import Synchronization
import Testing

@testable import GRPCConnectionManager

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
        _ path: String = "/echo.Echo/Get", _ request: [UInt8] = [], metadata: Metadata = [:],
        timeout: Duration? = nil, ledger: CompletionLedger? = nil, id: Int = 0
    ) async -> UnaryResponse {
        await withCheckedContinuation { continuation in
            self.unary(path: path, request: request, metadata: metadata, options: CallOptions(timeout: timeout)) {
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
        _ request: [UInt8], metadata: Metadata = [:], timeout: Duration? = nil, ledger: CompletionLedger? = nil,
        id: Int = 0
    ) async -> UnaryResponse {
        await self.call("/echo.Echo/Get", request, metadata: metadata, timeout: timeout, ledger: ledger, id: id)
    }
}

/// A loop plus an echo server on it; `shutdown()` closes both and waits.
final class LoopbackFixture: Sendable {
    let loop: EventLoop
    let server: EchoServer
    var target: String { self.server.address }

    init(options: EchoServer.Options = EchoServer.Options()) throws {
        self.loop = try EventLoop()
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

/// Monotonic seconds.
func now() -> Double {
    Double(Reactor.clock()) / 1e9
}

/// Open file descriptors of this process.
func openFDCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}
