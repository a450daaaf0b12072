import Foundation
import Synchronization
import Testing

@testable import GRPCConnectionManager
@_spi(Reactor) @testable import GRPCCMReactor
@testable import GRPCCMWire

/// The server dies under load and comes back, again and again: every call ends exactly once with a true status, no
/// response is another call's, and calls succeed again after each restart.
@Suite("Chaos against grpcio", .serialized)
struct ChaosTests {
    static let inFlight = 64
    /// Kills (each followed by a restart): a fixed count, so a slow restart makes the run longer, not the check fail.
    static let kills = 6
    static let period = 2.0

    static func configuration() -> Configuration {
        var configuration = Configuration()
        // The breaker would (rightly) refuse calls for 30 s after the first outage; this test is about connections.
        configuration.enableCircuitBreaker = false
        configuration.maxReconnectDelay = .milliseconds(300)
        configuration.minConnectTimeout = .seconds(1)
        return configuration
    }

    @Test("SIGKILL and restart every 2 s, six times, 64 calls in flight, each started from the previous one's completion")
    func fromCompletions() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var peer = try PythonPeer()
        let port = peer.port
        let channel = try GRPCChannel(target: "127.0.0.1:\(port)", configuration: Self.configuration(), eventLoop: loop)
        let ledger = ChaosLedger()
        let driver = CallbackDriver(channel: channel, ledger: ledger)
        loop.reactor.execute { for slot in 0..<Self.inFlight { driver.next(slot: slot) } }
        let restarts = try await Self.killAndRestart(&peer, port: port)
        driver.stop()
        #expect(await eventually(timeout: 20) { driver.inFlight.load(ordering: .acquiring) == 0 })
        peer.stop()
        Self.check(ledger, restarts: restarts)
    }

    @Test("SIGKILL and restart every 2 s, six times, 64 calls in flight from async tasks")
    func fromTasks() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        var peer = try PythonPeer()
        let port = peer.port
        let channel = try GRPCChannel(target: "127.0.0.1:\(port)", configuration: Self.configuration(), eventLoop: loop)
        let ledger = ChaosLedger()
        let running = RunningFlag()
        let workers = Task { @Sendable in
            await withTaskGroup(of: Void.self) { group in
                for slot in 0..<Self.inFlight {
                    group.addTask {
                        var sequence = 0
                        while running.isOn {
                            let id = ledger.begin()
                            let body = Array("t-\(slot)-\(sequence)".utf8)
                            sequence += 1
                            let response = await channel.unaryResult(
                                path: "/echo.Echo/Get", request: body, options: RequestOptions(timeout: .seconds(3)))
                            ledger.end(id, response: response, sent: body)
                        }
                    }
                }
            }
        }
        let restarts = try await Self.killAndRestart(&peer, port: port)
        running.turnOff()
        await workers.value
        peer.stop()
        Self.check(ledger, restarts: restarts)
    }

    /// Kills the server every `period` seconds, `kills` times, restarting it on the same port each time.
    /// - Returns: For each server's life, when it was up and when the next kill (or the end) came.
    static func killAndRestart(_ peer: inout PythonPeer, port: Int) async throws -> [(up: Double, until: Double)] {
        var windows: [(up: Double, until: Double)] = []
        var up = now()
        for _ in 0..<Self.kills {
            try await Task.sleep(nanoseconds: UInt64(Self.period * 1e9))
            windows.append((up, now()))
            peer.killHard()
            peer = try PythonPeer(port: port)
            up = now()
        }
        try await Task.sleep(nanoseconds: UInt64(Self.period * 1e9))
        windows.append((up, now()))
        return windows
    }

    static func check(_ ledger: ChaosLedger, restarts: [(up: Double, until: Double)]) {
        let summary = ledger.summary()
        print("chaos: \(summary.started) calls, codes \(summary.codes.map { "\($0.key.protoName)=\($0.value)" }.sorted()), \(restarts.count) server lives")
        #expect(summary.started > 1000, "enough load to mean something: \(summary)")
        #expect(summary.duplicates == 0, "a call completed twice: \(summary)")
        #expect(summary.completed == summary.started, "a call never completed: \(summary)")
        #expect(summary.mismatches == 0, "a response carried another call's body: \(summary)")
        #expect(summary.unexpectedCodes.isEmpty, "codes other than OK, UNAVAILABLE, DEADLINE_EXCEEDED: \(summary)")
        for (index, window) in restarts.enumerated() {
            #expect(ledger.succeeded(between: window.up, and: window.until), "no call succeeded after restart \(index)")
        }
    }
}

/// What every call came to, shared by the load and the checks.
final class ChaosLedger: Sendable {
    private struct State {
        var next = 0
        var started = 0
        var completions: [Int: Int] = [:]
        var duplicates = 0
        var mismatches = 0
        var unexpectedCodes: [StatusCode: Int] = [:]
        var codes: [StatusCode: Int] = [:]
        var successes: [Double] = []
    }

    private let state = PThreadLock(State())

    func begin() -> Int {
        self.state.withLock { state in
            state.next += 1
            state.started += 1
            return state.next
        }
    }

    func end(_ id: Int, response: UnaryResponse, sent: [UInt8]) {
        let at = now()
        self.state.withLock { state in
            state.completions[id, default: 0] += 1
            if state.completions[id]! > 1 { state.duplicates += 1 }
            state.codes[response.status.code, default: 0] += 1
            switch response.status.code {
            case .ok:
                if response.message != sent { state.mismatches += 1 }
                state.successes.append(at)
            case .unavailable, .deadlineExceeded:
                break
            default:
                state.unexpectedCodes[response.status.code, default: 0] += 1
            }
        }
    }

    func succeeded(between start: Double, and end: Double) -> Bool {
        self.state.withLock { $0.successes.contains { $0 > start && $0 < end } }
    }

    func summary() -> (started: Int, completed: Int, duplicates: Int, mismatches: Int, unexpectedCodes: [StatusCode: Int], codes: [StatusCode: Int]) {
        self.state.withLock { ($0.started, $0.completions.count, $0.duplicates, $0.mismatches, $0.unexpectedCodes, $0.codes) }
    }
}

/// 64 slots, each starting its next call from the previous call's completion, on the reactor thread.
final class CallbackDriver: Sendable {
    let channel: GRPCChannel
    let ledger: ChaosLedger
    let running = Atomic<Bool>(true)
    let inFlight = Atomic<Int>(0)
    private let sequence = Atomic<Int>(0)

    init(channel: GRPCChannel, ledger: ChaosLedger) {
        self.channel = channel
        self.ledger = ledger
    }

    func next(slot: Int) {
        guard self.running.load(ordering: .relaxed) else { return }
        let id = self.ledger.begin()
        let body = Array("c-\(slot)-\(self.sequence.add(1, ordering: .relaxed).newValue)".utf8)
        self.inFlight.add(1, ordering: .relaxed)
        self.channel.unary(path: "/echo.Echo/Get", request: body, options: RequestOptions(timeout: .seconds(3))) { response in
            self.ledger.end(id, response: response, sent: body)
            self.next(slot: slot)
            self.inFlight.add(-1, ordering: .releasing)
        }
    }

    func stop() { self.running.store(false, ordering: .relaxed) }
}

/// A flag many tasks read and one turns off.
final class RunningFlag: Sendable {
    private let value = Atomic<Bool>(true)
    var isOn: Bool { self.value.load(ordering: .relaxed) }
    func turnOff() { self.value.store(false, ordering: .relaxed) }
}
