// The same generated grpc-swift-2 client (Examples/grpc-swift-2) driven over two transports, one process per run:
//
//   transport-bench serve --port 50061                          # the embedded echo server (speaks echo.Echo)
//   transport-bench run --transport cm|nio --target 127.0.0.1:50061 --kind unary|stream
//                       [--concurrency 16] [--duration 5] [--warmup 1] [--payload-bytes 0]
//
// `unary`: `concurrency` tasks each calling Echo.Get in a loop. `stream`: `concurrency` Echo.Update streams,
// each keeping 64 messages in flight (a credit returns with each echo) while its response handler counts them. Prints one
// JSON object: calls (or messages) per second, latency percentiles (unary), and the client process's CPU per
// call from getrusage over the measured window only.
import EchoProto
import GRPCConnectionManager
import GRPCConnectionManagerTransport
import GRPCCore
import GRPCEchoServer
import GRPCNIOTransportHTTP2Posix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

struct Options {
    var mode = "run"
    var transport = "cm"
    var target = "127.0.0.1:50061"
    var kind = "unary"
    var concurrency = 16
    var duration = 5.0
    var warmup = 1.0
    var payloadBytes = 0
    var port = 50061

    init(_ arguments: [String]) {
        var rest = arguments.dropFirst()
        if let first = rest.first, !first.hasPrefix("--") {
            self.mode = first
            rest = rest.dropFirst()
        }
        var iterator = rest.makeIterator()
        while let flag = iterator.next() {
            let value = iterator.next() ?? ""
            switch flag {
            case "--transport": self.transport = value
            case "--target": self.target = value
            case "--kind": self.kind = value
            case "--concurrency": self.concurrency = Int(value) ?? 16
            case "--duration": self.duration = Double(value) ?? 5
            case "--warmup": self.warmup = Double(value) ?? 1
            case "--payload-bytes": self.payloadBytes = Int(value) ?? 0
            case "--port": self.port = Int(value) ?? 50061
            default:
                let text = Array("unknown option \(flag)\n".utf8)
                _ = text.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
                exit(2)
            }
        }
    }
}

func nowNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func cpuSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6 + Double(usage.ru_stime.tv_sec)
        + Double(usage.ru_stime.tv_usec) / 1e6
}

/// Shared between the workers: the phase and the measured counts.
final class Window: Sendable {
    let measuring = Atomic<Bool>(false)
    let stopped = Atomic<Bool>(false)
    let completed = Atomic<Int>(0)
    let errors = Atomic<Int>(0)
    let latencies = Mutex<[UInt64]>([])
}

func runWorkers<T: ClientTransport>(transport: T, options: Options) async throws -> [String: Double] {
    let window = Window()
    let text = String(repeating: "a", count: options.payloadBytes)
    let request = Echo_EchoRequest.with { $0.text = text }
    var cpuStart = 0.0
    var wallStart: UInt64 = 0
    var cpuEnd = 0.0
    var wallEnd: UInt64 = 0
    try await withGRPCClient(transport: transport) { client in
        let echo = Echo_Echo.Client(wrapping: client)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<options.concurrency {
                group.addTask {
                    if options.kind == "unary" {
                        var samples: [UInt64] = []
                        samples.reserveCapacity(100_000)
                        while !window.stopped.load(ordering: .relaxed) {
                            let begin = nowNanos()
                            do {
                                _ = try await echo.get(request)
                                if window.measuring.load(ordering: .relaxed) {
                                    window.completed.add(1, ordering: .relaxed)
                                    samples.append(nowNanos() - begin)
                                }
                            } catch {
                                if window.measuring.load(ordering: .relaxed) { window.errors.add(1, ordering: .relaxed) }
                            }
                        }
                        window.latencies.withLock { $0.append(contentsOf: samples) }
                    } else {
                        // At most 64 messages ahead of the echoes: a credit comes back with each one, so neither
                        // transport can win by buffering without bound or by starving the reader.
                        let (credits, creditFeed) = AsyncStream<Void>.makeStream()
                        try await echo.update { writer in
                            var outstanding = 0
                            var iterator = credits.makeAsyncIterator()
                            while !window.stopped.load(ordering: .relaxed) {
                                if outstanding >= 64 {
                                    guard await iterator.next() != nil else { break }
                                    outstanding -= 1
                                }
                                try await writer.write(request)
                                outstanding += 1
                            }
                        } onResponse: { response in
                            for try await _ in response.messages {
                                creditFeed.yield()
                                if window.measuring.load(ordering: .relaxed) { window.completed.add(1, ordering: .relaxed) }
                            }
                            creditFeed.finish()
                        }
                    }
                }
            }
            try await Task.sleep(for: .seconds(options.warmup))
            cpuStart = cpuSeconds()
            wallStart = nowNanos()
            window.measuring.store(true, ordering: .relaxed)
            try await Task.sleep(for: .seconds(options.duration))
            window.measuring.store(false, ordering: .relaxed)
            cpuEnd = cpuSeconds()
            wallEnd = nowNanos()
            window.stopped.store(true, ordering: .relaxed)
            try await group.waitForAll()
        }
    }
    let calls = Double(window.completed.load(ordering: .relaxed))
    let seconds = Double(wallEnd - wallStart) / 1e9
    var result: [String: Double] = [
        "requests": calls, "rps": calls / seconds, "errors": Double(window.errors.load(ordering: .relaxed)),
        "cpu_s": cpuEnd - cpuStart, "cpu_us_per_rpc": calls > 0 ? (cpuEnd - cpuStart) * 1e6 / calls : 0,
    ]
    let sorted = window.latencies.withLock { $0.sorted() }
    if !sorted.isEmpty {
        result["p50_us"] = Double(sorted[sorted.count / 2]) / 1000
        result["p99_us"] = Double(sorted[min(sorted.count - 1, sorted.count * 99 / 100)]) / 1000
    }
    return result
}

let options = Options(CommandLine.arguments)
switch options.mode {
case "serve":
    let server = try EchoServer(port: options.port)
    // One line, then nothing: the runner reads it to know the server is up (print flushes at exit only when
    // stdout is a pipe, so write(2) it).
    let line = Array("listening on \(server.address)\n".utf8)
    _ = line.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
    while true { sleep(3600) }
default:
    let result: [String: Double]
    if options.transport == "nio" {
        let parts = options.target.split(separator: ":")
        let transport = try HTTP2ClientTransport.Posix(
            target: .ipv4(address: String(parts[0]), port: Int(parts[1])!), transportSecurity: .plaintext)
        result = try await runWorkers(transport: transport, options: options)
    } else {
        let transport = try ManagedClientTransport(target: options.target)
        result = try await runWorkers(transport: transport, options: options)
    }
    let fields = result.keys.sorted().map { "\"\($0)\": \(($0 == "requests" || $0 == "errors") ? String(Int(result[$0]!)) : String(format2(result[$0]!)))" }
    print("{\"transport\": \"\(options.transport)\", \"kind\": \"\(options.kind)\", \"concurrency\": \(options.concurrency), "
        + "\"payload_bytes\": \(options.payloadBytes), " + fields.joined(separator: ", ") + "}")
}

func format2(_ value: Double) -> String {
    let scaled = (value * 100).rounded() / 100
    return String(scaled)
}
