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

/// Unary calls over loopback against the embedded echo server.
@Suite("Loopback calls against the embedded server", .serialized)
struct LoopbackCallTests {
    @Test("payloads of 0 B, 1 B, 64 KiB, 1 MiB and 4 MiB - 5 B echo back intact")
    func payloadsRoundTrip() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        for size in [0, 1, 64 << 10, 1 << 20, (4 << 20) - 5] {
            let request = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
            let response = await channel.call("/echo.Echo/Get", request, timeout: .seconds(20))
            #expect(response.status == .ok, "size \(size)")
            #expect(response.message == request, "size \(size)")
        }
    }

    @Test("every status code 1...16 comes back with its unicode message", arguments: 1...16)
    func statusCodesRoundTrip(code: Int) async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        let message = "échec № \(code) — 失敗 🙂 100%"
        var metadata = CallMetadata()
        metadata.add("x-fail-code", String(code))
        metadata.add("x-fail-message", PercentEncoding.encode(message))
        let response = await channel.call(metadata: metadata, timeout: .seconds(5))
        #expect(response.status.code.rawValue == code)
        #expect(response.status.message == message)
        #expect(response.message.isEmpty)
    }

    @Test("a 2 s server sleep with a 0.2 s deadline ends DEADLINE_EXCEEDED well under 1 s")
    func deadlineFires() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        let warm = await channel.call(timeout: .seconds(5))
        #expect(warm.status == .ok)
        let started = now()
        let response = await channel.call(metadata: ["x-sleep-ms": "10000"], timeout: .milliseconds(200))
        let elapsed = now() - started
        #expect(response.status.code == .deadlineExceeded)
        #expect(elapsed >= 0.19)
        #expect(elapsed < 3.0)  // not the server's 10 s; room for a loaded machine
        // The connection survives the reset stream.
        #expect(await channel.call([5], timeout: .seconds(5)).message == [5])
    }

    @Test("1,000 concurrent calls over a server limit of 100 streams all complete, exactly once")
    func thousandConcurrentCalls() async throws {
        var options = EchoServer.Options()
        options.maxConcurrentStreams = 100
        let fixture = try LoopbackFixture(options: options)
        let channel = try fixture.channel()
        let ledger = CompletionLedger()
        let results = await withTaskGroup(of: (Int, UnaryResponse).self) { group in
            for index in 0..<1_000 {
                group.addTask {
                    let payload = Array(String(index).utf8)
                    return (index, await channel.call(payload, timeout: .seconds(30), ledger: ledger, id: index))
                }
            }
            var collected: [(Int, UnaryResponse)] = []
            for await result in group { collected.append(result) }
            return collected
        }
        #expect(results.count == 1_000)
        for (index, response) in results {
            #expect(response.status == .ok)
            #expect(response.message == Array(String(index).utf8))
        }
        fixture.shutdown()
        #expect(ledger.completed == 1_000)
        #expect(ledger.duplicates == 0)
    }

    @Test("cancelling from another thread ends the call CANCELLED, once; the connection lives on")
    func cancellation() async throws {
        let fixture = try LoopbackFixture()
        let channel = try fixture.channel()
        let ledger = CompletionLedger()
        let started = now()
        let response = await withCheckedContinuation { (continuation: CheckedContinuation<UnaryResponse, Never>) in
            let handle = channel.unary(path: "/echo.Echo/Get", request: [1], metadata: ["x-sleep-ms": "5000"]) {
                ledger.record(1)
                continuation.resume(returning: $0)
            }
            Thread.detachNewThread {
                usleep(100_000)
                handle.cancel()
                handle.cancel()
            }
        }
        #expect(response.status.code == .cancelled)
        #expect(now() - started < 2)
        #expect(await channel.call([2], timeout: .seconds(5)).message == [2])
        fixture.shutdown()
        #expect(ledger.duplicates == 0)
    }

    @Test("cancelling the awaiting task cancels the call")
    func taskCancellation() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        let task = Task {
            await channel.unaryResult(path: "/echo.Echo/Get", request: [], metadata: ["x-sleep-ms": "5000"])
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        task.cancel()
        let response = await task.value
        #expect(response.status.code == .cancelled)
    }

    @Test("a response over the receive limit is RESOURCE_EXHAUSTED and the connection is kept")
    func oversizedResponse() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.maxMessageSize = 1000
        let channel = try fixture.channel(configuration)
        let response = await channel.call(metadata: ["x-response-bytes": "1001"], timeout: .seconds(5))
        #expect(response.status.code == .resourceExhausted)
        #expect(response.status.message.contains("1001"))
        let ok = await channel.call(metadata: ["x-response-bytes": "1000"], timeout: .seconds(5))
        #expect(ok.status == .ok)
        #expect(ok.message.count == 1000)
    }

    @Test("bad requests fail before anything is sent")
    func invalidRequests() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        var configuration = Configuration()
        configuration.maxMessageSize = 10
        let channel = try fixture.channel(configuration)
        var injected = CallMetadata()
        injected.add("x-key", "a\r\nx-evil: 1")
        #expect(await channel.call(metadata: injected).status.code == .invalidArgument)
        #expect(await channel.call("no-slash").status.code == .invalidArgument)
        #expect(await channel.call(Array(repeating: 0, count: 11)).status.code == .resourceExhausted)
        let negativeLimit = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [1], options: RequestOptions(maxReceiveMessageSize: -1))
        #expect(negativeLimit.status.code == .invalidArgument, "\(negativeLimit.status)")
        #expect(await channel.call([1]).status == .ok)
    }

    @Test("metadata, including -bin, is sent and echoed back")
    func metadataRoundTrip() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        var metadata = CallMetadata()
        metadata.add("x-text", "hello world")
        metadata.add("x-data-bin", binary: [0, 1, 2, 0xFF, 0x0A])
        let response = await channel.call(metadata: metadata, timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(response.initialMetadata["x-text"] == "hello world")
        #expect(response.initialMetadata.values(for: "x-data-bin") == [.binary([0, 1, 2, 0xFF, 0x0A])])
    }

    @Test("a metadata value's spaces at either end are left out, as HTTP/2 requires (a server that checks reset the stream)")
    func metadataSpacesTrimmed() async throws {
        let fixture = try LoopbackFixture()
        defer { fixture.shutdown() }
        let channel = try fixture.channel()
        var metadata = CallMetadata()
        metadata.add("x-lead", " lead")
        metadata.add("x-trail", "trail  ")
        metadata.add("x-both", "  a b  ")
        metadata.add("x-blank", " ")
        let response = await channel.call(metadata: metadata, timeout: .seconds(5))
        #expect(response.status == .ok, "\(response.status)")
        #expect(response.initialMetadata["x-lead"] == "lead")
        #expect(response.initialMetadata["x-trail"] == "trail")
        #expect(response.initialMetadata["x-both"] == "a b")
        #expect(response.initialMetadata["x-blank"] == "")
    }

    @Test("health check answers SERVING for the empty service")
    func healthCheck() async throws {
        let fixture = try LoopbackFixture()
        let channel = try fixture.channel()
        let response = await channel.call("/grpc.health.v1.Health/Check", [], timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(response.message == [0x08, 0x01])
        let unknown = await channel.call("/grpc.health.v1.Health/Check", [0x0A, 0x01, 0x78], timeout: .seconds(5))
        #expect(unknown.status.code == .notFound)
        fixture.shutdown()
    }

    @Test("Unix-domain targets work, and a host name reaches a server on the address it resolves to")
    func unixAndHostName() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let path = "/tmp/grpc-cm-test-\(getpid()).sock"
        let unixServer = try EchoServer(host: "unix:\(path)", eventLoop: loop)
        defer { unixServer.close() }
        let unixChannel = try GRPCChannel(target: "unix:\(path)", eventLoop: loop)
        #expect(await unixChannel.call([7], timeout: .seconds(5)).message == [7])
        let v4Server = try EchoServer(host: "127.0.0.1", eventLoop: loop)
        defer { v4Server.close() }
        let named = try GRPCChannel(target: "localhost:\(v4Server.port)", eventLoop: loop)
        let response = await named.call([5], timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(response.message == [5])
    }

    @Test("a Unix path: a file there is refused and kept, a live server's path refused, a stale socket replaced, ours removed on close")
    func unixPathIsClaimedWithCare() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let path = "/tmp/grpc-cm-test-claim-\(getpid()).sock"
        unlink(path)
        defer { unlink(path) }

        #expect(FileManager.default.createFile(atPath: path, contents: Data("keep me".utf8)))
        #expect(throws: ReactorError.self) { try EchoServer(host: "unix:\(path)", eventLoop: loop) }
        #expect(FileManager.default.contents(atPath: path) == Data("keep me".utf8), "a file is never deleted")
        unlink(path)

        // A socket left by a server that died: nobody listens, so it is replaced.
        let dead = UnixSocket(path)
        #expect(dead.bind() == 0)
        close(dead.fd)
        let server = try EchoServer(host: "unix:\(path)", eventLoop: loop)
        let channel = try GRPCChannel(target: "unix:\(path)", eventLoop: loop)
        defer { channel.close() }
        #expect(await channel.call([3], timeout: .seconds(5)).message == [3])

        // A second server on a live path is refused, and the first keeps serving.
        #expect(throws: ReactorError.self) { try EchoServer(host: "unix:\(path)", eventLoop: loop) }
        #expect(await channel.call([4], timeout: .seconds(5)).message == [4])

        server.close()
        #expect(!FileManager.default.fileExists(atPath: path), "the socket file goes with the server")
    }

    @Test("a Unix listener whose backlog is full fails the connect at once (EAGAIN), and a server there later is reached")
    func unixBacklogFull() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let path = "/tmp/grpc-cm-test-backlog-\(getpid()).sock"
        unlink(path)
        defer { unlink(path) }
        // A listener that never accepts, with a backlog of 0: one client fills it, the next connect gets EAGAIN.
        let listener = UnixSocket(path)
        #expect(listener.bind() == 0)
        #expect(listen(listener.fd, 0) == 0)
        let filler = UnixSocket(path)
        #expect(filler.connect() == 0)

        var configuration = Configuration.defaults
        configuration.enableRetry = false
        let channel = try GRPCChannel(target: "unix:\(path)", configuration: configuration, eventLoop: loop)
        defer { channel.close() }
        let started = now()
        let refused = await channel.call([1], timeout: .seconds(10))
        #expect(refused.status.code == .unavailable, "\(refused.status)")
        #expect(refused.status.message.contains("connect to unix:\(path) failed: Resource temporarily unavailable"), "\(refused.status.message)")
        #expect(now() - started < 5, "a full backlog is a failed connect, not one that waits for the deadline")

        close(filler.fd)
        close(listener.fd)
        unlink(path)
        let server = try EchoServer(host: "unix:\(path)", eventLoop: loop)
        defer { server.close() }
        let reached = await channel.unaryResult(
            path: "/echo.Echo/Get", request: [2], options: RequestOptions(timeout: .seconds(10), waitForReady: true))
        #expect(reached.status == .ok, "\(reached.status)")
    }

    /// Whether this machine can listen on `::1` (containers often have no IPv6 loopback).
    static let ipv6LoopbackAvailable: Bool = {
        let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_in6()
        address.sin6_family = sa_family_t(AF_INET6)
        address.sin6_addr = in6addr_loopback
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        } == 0
    }()

    @Test("IPv6 targets work", .enabled(if: Self.ipv6LoopbackAvailable, "this machine has no IPv6 loopback (::1)"))
    func ipv6() async throws {
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        let server = try EchoServer(host: "::1", eventLoop: loop)
        defer { server.close() }
        let channel = try GRPCChannel(target: "[::1]:\(server.port)", eventLoop: loop)
        let response = await channel.call([6], timeout: .seconds(5))
        #expect(response.status == .ok)
        #expect(response.message == [6])
    }

    /// A link-local IPv6 address of this host with its zone (`fe80:...%eth0`), from the kernel's list; nil if none.
    static let linkLocalAddress: String? = {
        guard let text = try? String(contentsOfFile: "/proc/net/if_inet6", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count == 6, fields[0].hasPrefix("fe80"), fields[0].count == 32 else { continue }
            let hex = Array(fields[0])
            let groups = stride(from: 0, to: 32, by: 4).map { String(hex[$0..<$0 + 4]) }
            return groups.joined(separator: ":") + "%" + fields[5]
        }
        return nil
    }()

    @Test(
        "a link-local IPv6 target with its zone connects through that interface, written %zone or %25zone",
        .enabled(if: Self.linkLocalAddress != nil, "this machine has no link-local IPv6 address"))
    func linkLocalIPv6() async throws {
        let address = try #require(Self.linkLocalAddress)
        let loop = try ReactorLoop()
        loop.start()
        defer { loop.shutdown() }
        // Without its zone a link-local address can neither be bound nor connected to (EINVAL).
        try EchoServer(host: address, eventLoop: loop).close()
        let server = try EchoServer(host: "::", eventLoop: loop)
        defer { server.close() }
        for written in [address, address.split(separator: "%").joined(separator: "%25")] {
            let channel = try GRPCChannel(target: "[\(written)]:\(server.port)", eventLoop: loop)
            let response = await channel.call([7], timeout: .seconds(5))
            #expect(response.status == .ok, "\(written): \(response.status)")
            #expect(response.message == [7])
            channel.close()
        }
    }

    @Test("after a GOAWAY, in-flight calls finish and new calls go to a new connection")
    func goAwayDrains() async throws {
        let fixture = try LoopbackFixture()
        let channel = try fixture.channel()
        let ledger = CompletionLedger()
        #expect(await channel.call([0], timeout: .seconds(5)).status == .ok)
        let results = await withTaskGroup(of: UnaryResponse.self) { group in
            for index in 1...20 {
                group.addTask {
                    await channel.call(
                        [UInt8(index)], metadata: ["x-sleep-ms": "300"], timeout: .seconds(5), ledger: ledger, id: index)
                }
            }
            try? await Task.sleep(nanoseconds: 100_000_000)
            fixture.server.goAway()
            var collected: [UnaryResponse] = []
            for await response in group { collected.append(response) }
            return collected
        }
        #expect(results.count == 20)
        #expect(results.allSatisfy { $0.status == .ok })
        let after = await channel.call([42], timeout: .seconds(5), ledger: ledger, id: 100)
        #expect(after.status == .ok)
        #expect(after.message == [42])
        fixture.shutdown()
        #expect(ledger.duplicates == 0)
        #expect(ledger.completed == 21)
    }

    @Test("shutting the loop down closes every fd it opened")
    func shutdownClosesEverything() async throws {
        let before = openFDCount()
        do {
            let fixture = try LoopbackFixture()
            let channel = try fixture.channel()
            for _ in 0..<3 { #expect(await channel.call([1], timeout: .seconds(5)).status == .ok) }
            fixture.shutdown()
        }
        #expect(openFDCount() == before)
    }
}
