// grpc-cm-perf: closed-loop (or open-loop with --rate) unary calls through grpc-connection-manager, printing ONE
// JSON object with the same fields as the peer clients in ../shared/peers, so the numbers compare as ratios.
//
// The closed loop runs on the reactor thread: each completion starts the next call of its slot, so no thread hop
// is measured that a real callback user would not pay. CPU is getrusage(RUSAGE_SELF) over the measured window.
import ArgumentParser
import CMallocCounter
import Foundation
import GRPCConnectionManager
import GRPCEchoServer
import Histogram
import Synchronization

@main
struct Perf: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "grpc-cm-perf")

    @Option(help: "HOST:PORT of the server; none starts the embedded echo server as a child (pinned to CPU 0).")
    var target: String?
    @Option(help: "Method path (any path echoes).") var method = "/echo.Echo/Call"
    @Option(name: .customLong("payload-bytes")) var payloadBytes = 0
    @Option(help: "Separate connections (channels).") var connections = 1
    @Option(help: "Calls in flight in total (closed loop).") var concurrency = 1
    @Option(help: "Measured seconds.") var duration = 10.0
    @Option(help: "Instead of --duration: stop after this many calls, every one measured (no warm-up); a fixed workload for callgrind.") var requests: Int?
    @Option(help: "Unmeasured warm-up seconds.") var warmup = 1.0
    @Option(help: "Open loop: start this many calls per second; latency counts from the scheduled start.") var rate: Double?
    @Option(name: .customLong("stream-mode"), help: "pingpong: --concurrency bidirectional streams (on /echo.Echo/Stream unless --method is given), each sending its next message when the echo of the last arrives; the figures count round trips.") var streamMode: String?
    @Option(help: "Write the HdrHistogram percentile distribution (microseconds) here.") var hgrm: String?
    @Flag(name: .customLong("no-percentiles"), help: "Leave the latency figures out of the report: computing them walks every recorded value, work that grows with the run and so does not cancel out of a difference of two runs under callgrind.") var noPercentiles = false
    @Option(name: .customLong("idle-connections"), help: "Instead: open N connections, one call each, hold them.") var idleConnections: Int?
    @Option(name: .customLong("idle-hold"), help: "Seconds to hold the idle connections.") var idleHold = 3.0
    @Flag(name: .customLong("idle-shared"), help: "With --idle-connections: one channel holding the N connections (connectionsPerTarget N) instead of one channel per connection.") var idleShared = false
    @Flag(name: .customLong("idle-manager"), help: "With --idle-connections: one ConnectionManager with N services, a connection each, instead of N standalone channels.") var idleManager = false
    @Flag(help: "Switch off retry and the circuit breaker (the peers have neither).") var bare = false
    @Option(help: "Give every unary call this deadline, in seconds (sent as grpc-timeout, a timer armed per call).") var timeout: Double?
    @Option(help: "Run on a ReactorGroup of this many loops (closed loop only): each loop gets its own connections.") var loops = 1
    @Option(name: .customLong("user-timers"), help: "Park this many user timers (an hour away) on the loop first.") var userTimers = 0
    @Option(name: .customLong("user-fds"), help: "Register this many idle user fds (pipes) on the loop first.") var userFDs = 0
    @Option(name: .customLong("serve-port"), help: .hidden) var servePort: Int?

    func run() throws {
        if let port = self.servePort { try Self.serve(port: port) }
        var child: Process?
        var target = self.target ?? ""
        if self.target == nil {
            let port = Int.random(in: 40000...60000)
            child = try Self.spawnServer(port: port)
            target = "127.0.0.1:\(port)"
            Thread.sleep(forTimeInterval: 0.5)
        }
        defer { child?.terminate() }
        var configuration = Configuration()
        if self.bare {
            configuration.enableRetry = false
            configuration.enableCircuitBreaker = false
        }
        let loop = try ReactorLoop()
        loop.start()
        if let idle = self.idleConnections {
            try self.idleRun(target: target, configuration: configuration, loop: loop, count: idle)
            return
        }
        let group = self.loops > 1 ? try ReactorGroup(loopCount: self.loops) : nil
        try Self.parkUserWork(on: group?.loops ?? [loop], timers: self.userTimers, fds: self.userFDs)
        let channels = try (0..<max(1, self.connections)).map { _ in
            if let group { return try GRPCChannel(target: target, configuration: configuration, group: group) }
            return try GRPCChannel(target: target, configuration: configuration, eventLoop: loop)
        }
        let driver = Driver(channels: channels, method: self.method, payload: [UInt8](repeating: 0x61, count: self.payloadBytes))
        driver.loop = loop
        if let timeout = self.timeout { driver.options.timeout = .nanoseconds(Int64(timeout * 1e9)) }
        if let mode = self.streamMode {
            guard mode == "pingpong" else { throw ValidationError("--stream-mode: only pingpong") }
            driver.method = self.method == "/echo.Echo/Call" ? "/echo.Echo/Stream" : self.method
            driver.pingPong(streams: self.concurrency, requests: self.requests, warmup: self.warmup, duration: self.duration)
        } else if let requests = self.requests {
            driver.fixedCount(concurrency: self.concurrency, requests: requests)
        } else if let rate = self.rate {
            driver.openLoop(rate: rate, warmup: self.warmup, duration: self.duration)
        } else {
            driver.closedLoop(concurrency: self.concurrency, warmup: self.warmup, duration: self.duration)
        }
        print(driver.json(percentiles: !self.noPercentiles))
        if let path = self.hgrm { try driver.distribution().write(toFile: path, atomically: true, encoding: .utf8) }
    }

    func idleRun(target: String, configuration: Configuration, loop: ReactorLoop, count: Int) throws {
        // Each connection is one fd: raise the soft limit to the hard one (as the C++ peer does).
        var limit = rlimit()
        if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 {
            limit.rlim_cur = limit.rlim_max
            setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        }
        let before = Self.rssKB()
        var channels: [GRPCChannel] = []
        var managers: [ConnectionManager] = []
        let done = Atomic<Int>(0)
        let errors = Atomic<Int>(0)
        let call = { (channel: GRPCChannel) in
            channel.unary(path: self.method, request: [], options: RequestOptions(timeout: .seconds(30))) { response in
                if !response.status.isOK { errors.add(1, ordering: .relaxed) }
                done.add(1, ordering: .relaxed)
            }
        }
        if self.idleShared {
            // One channel, N connections: its first call connects them all; once all are up, N calls at once go one
            // to each (least loaded), so every connection has carried a call, as with a channel each.
            var shared = configuration
            shared.connectionsPerTarget = count
            let channel = try GRPCChannel(target: target, configuration: shared, eventLoop: loop)
            channels.append(channel)
            let up = Atomic<Int>(0)
            let token = channel.events.subscribe { event in
                if case .connectAttemptSucceeded = event { up.add(1, ordering: .relaxed) }
            }
            call(channel)
            while up.load(ordering: .relaxed) < count || done.load(ordering: .relaxed) < 1 { usleep(1000) }
            channel.events.unsubscribe(token)
            done.store(0, ordering: .relaxed)
            for _ in 0..<count { call(channel) }
        } else if self.idleManager {
            // One manager, N services on the same target: its bus, handlers and name cache are shared, as in a
            // service that reaches many others.
            let manager = try ConnectionManager(configuration: configuration, eventLoop: loop)
            managers.append(manager)
            for index in 0..<count {
                let channel = try manager.connection(service: "service-\(index)", address: target)
                channels.append(channel)
                call(channel)
            }
        } else {
            for _ in 0..<count {
                let channel = try GRPCChannel(target: target, configuration: configuration, eventLoop: loop)
                channels.append(channel)
                call(channel)
            }
        }
        while done.load(ordering: .relaxed) < count { usleep(1000) }
        Thread.sleep(forTimeInterval: self.idleHold)
        let after = Self.rssKB()
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
        print(
            "{\"idle_connections\": \(count), \"shared_channel\": \(self.idleShared), \"manager\": \(self.idleManager), \"errors\": \(errors.load(ordering: .relaxed)), \"rss_kb_before\": \(before), "
                + "\"rss_kb\": \(after), \"rss_kb_per_connection\": \(String(format: "%.2f", Double(after - before) / Double(max(count, 1)))), "
                + "\"open_fds\": \(fds), \"os_threads\": \(Self.threads())}")
        withExtendedLifetime((channels, managers)) {}
    }

    /// User timers far in the future and idle user fds on each loop: they must cost a gRPC call nothing.
    static func parkUserWork(on loops: [ReactorLoop], timers: Int, fds: Int) throws {
        guard timers > 0 || fds > 0 else { return }
        for loop in loops {
            for _ in 0..<timers { loop.scheduleTimer(after: .seconds(3600)) {} }
            let done = Atomic<Bool>(false)
            loop.execute {
                for _ in 0..<fds {
                    var ends: [Int32] = [0, 0]
                    guard pipe(&ends) == 0 else { break }
                    _ = try? loop.register(fd: ends[0], interest: .readable) { _ in }
                }
                done.store(true, ordering: .releasing)
            }
            while !done.load(ordering: .acquiring) { usleep(1000) }
        }
    }

    static func spawnServer(port: Int) throws -> Process {
        let process = Process()
        let me = CommandLine.arguments[0]
        let cpus = ProcessInfo.processInfo.activeProcessorCount
        if cpus >= 2, FileManager.default.isExecutableFile(atPath: "/usr/bin/taskset") {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
            process.arguments = ["-c", "0", me, "--serve-port", String(port)]
        } else {
            process.executableURL = URL(fileURLWithPath: me)
            process.arguments = ["--serve-port", String(port)]
        }
        try process.run()
        return process
    }

    static func serve(port: Int) throws -> Never {
        let server = try EchoServer(port: port)
        _ = server
        while true { sleep(3600) }
    }

    static func rssKB() -> Int { Self.status("VmRSS:") }
    static func threads() -> Int { Self.status("Threads:") }
    static func status(_ key: String) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return -1 }
        for line in text.split(separator: "\n") where line.hasPrefix(key) {
            return Int(line.dropFirst(key.count).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") ?? -1
        }
        return -1
    }
}

/// The load: reactor-thread state behind `@unchecked Sendable` (touched by completions on the reactor thread, and
/// read by the main thread only after the run has stopped and drained).
final class Driver: @unchecked Sendable {
    let channels: [GRPCChannel]
    var method: String
    let payload: [UInt8]
    /// Every unary call's options (`--timeout`).
    var options = RequestOptions()
    /// "unary" or "pingpong" (a round trip on a stream counts as one request).
    var mode = "unary"
    /// Ping-pong: each slot's stream; set before its first message is sent, read by its callbacks on the loop.
    var streams: [StreamingCall?] = []
    let streamsFinished = Atomic<Int>(0)
    /// Per slot: a slot's calls all run on one loop (a completion starts the next on its own loop), so its numbers are
    /// touched by one thread at a time; merged at the end.
    final class SlotStats: @unchecked Sendable {
        // `@unchecked`: one loop's thread at a time (see above). For the same reason the histogram skips the runtime
        // exclusivity check, which cost about 120 instructions a call: the harness's own, counted by the gate.
        @exclusivity(unchecked)
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        var requests = 0
        var errors = 0
        /// Ping-pong: when the stream's message in flight was sent; closed loop: when the slot's call started.
        var began: UInt64 = 0
        /// Closed loop: the slot's completion, made once and given to each of its calls (it reads `began` from here).
        /// A closure per call, capturing when it began, was a heap allocation and its release per call: about 290
        /// instructions of the harness's own counted at the gate, work a program that keeps per-request state in
        /// its own slots (as the C++ peer does with its tags) does not do.
        var completion: (@Sendable (UnaryResponse) -> Void)?
    }
    var slots: [SlotStats] = []
    var histogram: Histogram<UInt64> {
        var merged = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        for slot in self.slots { merged.add(slot.histogram) }
        return merged
    }
    var requests: Int { self.slots.reduce(0) { $0 + $1.requests } }
    var errors: Int { self.slots.reduce(0) { $0 + $1.errors } }
    let measuring = Atomic<Bool>(false)
    let stopped = Atomic<Bool>(false)
    let inFlight = Atomic<Int>(0)
    /// Signalled by the last completion of a fixed workload (the last call, or the last stream's end). The main
    /// thread waits on it rather than polling: a poll every millisecond ran for as long as the run took, so under
    /// callgrind its instructions grew with the machine's speed and did not cancel out of two runs' difference.
    let allDone = DispatchSemaphore(value: 0)
    /// Open loop: the calls that count are those scheduled in [start, end) of this window, however late they end
    /// (those scheduled in the warm-up, or after the window, do not); nil otherwise.
    var openWindow: (start: UInt64, end: UInt64)?
    /// An open-loop run (its report has `offered` and `unfinished`).
    var isOpenLoop = false
    /// Open loop: calls scheduled in the window (the pacer's count), and those of them not finished when the run
    /// gave up waiting for them.
    let offered = Atomic<Int>(0)
    var unfinished = 0
    /// The first failed call's status (loop thread; read once the run is over), for the report.
    var firstError: String?
    /// The loop the completions run on (one loop: open loop runs on one).
    var loop: ReactorLoop?
    var usage = (user: 0.0, sys: 0.0, wall: 0.0)
    /// Heap allocations of the whole process during the measured window (CMallocCounter).
    var allocations: UInt64 = 0
    var maxRSS = 0
    /// With a fixed workload: the number of calls to start in all (0: run for a duration).
    var budget = 0
    var started = 0

    init(channels: [GRPCChannel], method: String, payload: [UInt8]) {
        self.channels = channels
        self.method = method
        self.payload = payload
        self.slots = [SlotStats()]
    }

    /// One stats record per closed-loop slot.
    func prepareSlots(_ count: Int) {
        self.slots = (0..<max(count, 1)).map { _ in SlotStats() }
        // The closures hold the driver (and it them) for the life of the process: one driver a run.
        for (slot, stats) in self.slots.enumerated() {
            stats.completion = { response in
                self.finished(slot: slot, began: stats.began, response: response, closedLoop: true)
            }
        }
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    func start(slot: Int, scheduled: UInt64? = nil) {
        let channel = self.channels[slot % self.channels.count]
        self.inFlight.add(1, ordering: .relaxed)
        if let scheduled {
            // Open loop: many calls in flight share slot 0, each with its own scheduled start.
            channel.unary(path: self.method, request: self.payload, options: self.options) { response in
                self.finished(slot: slot, began: scheduled, response: response, closedLoop: false)
            }
            return
        }
        let stats = self.slots[slot]
        stats.began = Self.now()
        channel.unary(path: self.method, request: self.payload, options: self.options, completion: stats.completion!)
    }

    func finished(slot: Int, began: UInt64, response: UnaryResponse, closedLoop: Bool) {
        if let window = self.openWindow {
            // Open loop: by when it was scheduled, not when it ended (a call that ends after the window counts, one
            // scheduled in the warm-up does not).
            if began >= window.start && began < window.end {
                let stats = self.slots[0]
                stats.requests += 1
                if !response.status.isOK || response.message.count != self.payload.count { self.noteError(response, stats) }
                _ = stats.histogram.record((Self.now() - began) / 1000)
            }
        } else if self.measuring.load(ordering: .relaxed) {
            let stats = self.slots[closedLoop ? slot : 0]
            stats.requests += 1
            if !response.status.isOK || response.message.count != self.payload.count { self.noteError(response, stats) }
            _ = stats.histogram.record((Self.now() - began) / 1000)
        }
        if self.budget > 0 {
            // The next call counts as in flight before this one stops counting, so the waiting thread never sees 0
            // between them.
            if self.started < self.budget {
                self.started += 1
                self.start(slot: slot)
            }
            if self.inFlight.add(-1, ordering: .acquiringAndReleasing).newValue == 0 { self.allDone.signal() }
            return
        }
        self.inFlight.add(-1, ordering: .relaxed)
        if closedLoop && !self.stopped.load(ordering: .relaxed) { self.start(slot: slot) }
    }

    private func noteError(_ response: UnaryResponse, _ stats: SlotStats) {
        stats.errors += 1
        if self.firstError == nil {
            self.firstError = response.status.isOK
                ? "a response of \(response.message.count) bytes" : "\(response.status.code): \(response.status.message)"
        }
    }

    /// Exactly `requests` calls, `concurrency` at a time, all measured: the same work in every run, which is what an
    /// instruction count needs (callgrind counts the same for the same work whatever the machine does).
    func fixedCount(concurrency: Int, requests: Int) {
        self.prepareSlots(concurrency)
        self.budget = requests
        let first = min(max(1, concurrency), requests)
        self.started = first
        let startUsage = Self.processUsage()
        let startWall = Self.now()
        let startAllocations = cmc_allocations()
        self.measuring.store(true, ordering: .relaxed)
        // This thread holds a count while it starts the first calls: one that ends before the next is started must
        // not find none in flight and signal the end.
        self.inFlight.add(1, ordering: .relaxed)
        for slot in 0..<first { self.start(slot: slot) }
        if self.inFlight.add(-1, ordering: .acquiringAndReleasing).newValue == 0 { self.allDone.signal() }
        // The completions start the rest on the reactor thread; this thread only waits for the last to end.
        self.allDone.wait()
        self.measuring.store(false, ordering: .relaxed)
        self.allocations = cmc_allocations() - startAllocations
        let endUsage = Self.processUsage()
        self.usage = (endUsage.user - startUsage.user, endUsage.sys - startUsage.sys, Double(Self.now() - startWall) / 1e9)
        self.maxRSS = endUsage.maxRSS
        self.stopped.store(true, ordering: .relaxed)
    }

    /// Warm-up, then the measured window; then waits for the calls in flight, for at most `drainFor` seconds (nil: as
    /// long as they take).
    func measure(warmup: Double, duration: Double, drainFor: Double? = nil, during body: () -> Void = {}) {
        Thread.sleep(forTimeInterval: warmup)
        let startUsage = Self.processUsage()
        let startWall = Self.now()
        let startAllocations = cmc_allocations()
        self.measuring.store(true, ordering: .relaxed)
        Thread.sleep(forTimeInterval: duration)
        self.measuring.store(false, ordering: .relaxed)
        self.allocations = cmc_allocations() - startAllocations
        let endUsage = Self.processUsage()
        let endWall = Self.now()
        self.stopped.store(true, ordering: .relaxed)
        self.usage = (endUsage.user - startUsage.user, endUsage.sys - startUsage.sys, Double(endWall - startWall) / 1e9)
        self.maxRSS = endUsage.maxRSS
        let giveUp = drainFor.map { endWall &+ UInt64($0 * 1e9) } ?? UInt64.max
        while self.inFlight.load(ordering: .relaxed) > 0 && Self.now() < giveUp { usleep(1000) }
    }

    func closedLoop(concurrency: Int, warmup: Double, duration: Double) {
        self.prepareSlots(concurrency)
        for slot in 0..<max(1, concurrency) { self.start(slot: slot) }
        self.measure(warmup: warmup, duration: duration)
    }

    /// Bidirectional ping-pong: `streams` streams, each sending a message and the next one when its echo arrives
    /// (from the message callback, on the loop). With `requests`, exactly that many round trips in all, measured from
    /// the first (a fixed workload for callgrind); otherwise warm-up then the measured window. Each stream is closed
    /// at the end and must finish OK.
    func pingPong(streams: Int, requests: Int?, warmup: Double, duration: Double) {
        self.mode = "pingpong"
        let count = max(1, streams)
        self.prepareSlots(count)
        self.streams = Array(repeating: nil, count: count)
        self.budget = requests ?? 0
        self.started = min(count, self.budget)
        for slot in 0..<count {
            let channel = self.channels[slot % self.channels.count]
            let call = channel.bidirectionalStreaming(
                path: self.method, options: RequestOptions(timeout: .seconds(3600)),
                callbacks: StreamingCallbacks(
                    onMessage: { message in
                        self.roundTripEnded(slot: slot, message: message)
                    },
                    onFinish: { result in
                        if !result.status.isOK { self.slots[slot].errors += 1 }
                        if self.streamsFinished.add(1, ordering: .acquiringAndReleasing).newValue == count {
                            self.allDone.signal()
                        }
                    }))
            self.streams[slot] = call
            if self.budget == 0 || slot < self.budget {
                self.slots[slot].began = Self.now()
                _ = call.send(self.payload)
            } else {
                call.closeSend()
            }
        }
        if self.budget > 0 {
            let startUsage = Self.processUsage()
            let startWall = Self.now()
            let startAllocations = cmc_allocations()
            self.measuring.store(true, ordering: .relaxed)
            self.allDone.wait()
            self.measuring.store(false, ordering: .relaxed)
            self.allocations = cmc_allocations() - startAllocations
            let endUsage = Self.processUsage()
            self.usage = (endUsage.user - startUsage.user, endUsage.sys - startUsage.sys, Double(Self.now() - startWall) / 1e9)
            self.maxRSS = endUsage.maxRSS
            return
        }
        self.measure(warmup: warmup, duration: duration)
        // `stopped` is set: each stream closes when its last echo arrives.
        while self.streamsFinished.load(ordering: .acquiring) < count { usleep(1000) }
    }

    private func roundTripEnded(slot: Int, message: [UInt8]) {
        let stats = self.slots[slot]
        if self.measuring.load(ordering: .relaxed) || self.budget > 0 {
            stats.requests += 1
            if message.count != self.payload.count { stats.errors += 1 }
            _ = stats.histogram.record((Self.now() - stats.began) / 1000)
        }
        guard let call = self.streams[slot] else { return }
        let more: Bool
        if self.budget > 0 {
            more = self.started < self.budget
            if more { self.started += 1 }
        } else {
            more = !self.stopped.load(ordering: .relaxed)
        }
        if more {
            stats.began = Self.now()
            _ = call.send(self.payload)
        } else {
            call.closeSend()
        }
    }

    /// Open loop: calls scheduled `rate` a second from now for the warm-up and the window, and none after it; those
    /// scheduled in the window are measured from their scheduled start to their end, however late. After the window
    /// the run waits for them up to `max(duration, 2 s)`: those still unfinished then are reported as such (a load
    /// the server cannot keep up with), not left out of the figures without a word.
    func openLoop(rate: Double, warmup: Double, duration: Double) {
        let interval = UInt64(1e9 / rate)
        let t0 = Self.now()
        let window = (start: t0 + UInt64(warmup * 1e9), end: t0 + UInt64((warmup + duration) * 1e9))
        self.openWindow = window
        self.isOpenLoop = true
        let pacer = Thread {
            var next = t0
            var slot = 0
            while !self.stopped.load(ordering: .relaxed) && next < window.end {
                let now = Self.now()
                if now < next {
                    usleep(UInt32(min((next - now) / 1000, 1000)))
                    continue
                }
                // Every call that is due (at most 64 at once), then the CPU goes back to the loop: pinned to one core
                // with it, a pacer that only ever caught up would starve the loop it feeds.
                var burst = 0
                while next <= now && burst < 64 && next < window.end {
                    if next >= window.start { self.offered.add(1, ordering: .relaxed) }
                    self.start(slot: slot, scheduled: next)
                    slot += 1
                    next += interval
                    burst += 1
                }
                sched_yield()
            }
        }
        pacer.start()
        self.measure(warmup: warmup, duration: duration, drainFor: max(duration, 2))
        // What was offered in the window and has not ended by now (the slots' counts are the loop's: read there).
        // On the loop, where the completions write: the window closes (a call that ends from now on is not
        // counted: the report is read on this thread) and the count is taken.
        let counted = Atomic<Int>(0)
        let done = DispatchSemaphore(value: 0)
        if let loop = self.loop, loop.execute({
            self.openWindow = nil
            counted.store(self.slots[0].requests, ordering: .releasing)
            done.signal()
        }) {
            done.wait()
        }
        self.unfinished = max(0, self.offered.load(ordering: .relaxed) - counted.load(ordering: .acquiring))
    }

    static func processUsage() -> (user: Double, sys: Double, maxRSS: Int) {
        var usage = Glibc.rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        let user = Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6
        let sys = Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6
        return (user, sys, usage.ru_maxrss)
    }

    func json(percentiles: Bool = true) -> String {
        let requests = max(self.requests, 1)
        // Merged once: `histogram` merges the slots' histograms on every read.
        let latency: [(String, String)]
        if percentiles {
            let histogram = self.histogram
            latency = [
                ("p50_us", "\(histogram.valueAtPercentile(50))"),
                ("p90_us", "\(histogram.valueAtPercentile(90))"),
                ("p99_us", "\(histogram.valueAtPercentile(99))"),
                ("p999_us", "\(histogram.valueAtPercentile(99.9))"),
                ("mean_us", String(format: "%.1f", histogram.mean)),
                ("max_us", "\(histogram.max)"),
            ]
        } else {
            latency = []
        }
        // Payload bytes moved in the window, both ways (a request and its echo).
        let mib = Double(self.requests) * Double(self.payload.count) * 2 / 1_048_576
        let cpu = self.usage.user + self.usage.sys
        let fields: [(String, String)] = [
            ("client", "\"grpc-cm\""),
            ("mode", "\"\(self.mode)\""),
            ("mib_per_s", String(format: "%.2f", mib / max(self.usage.wall, 1e-9))),
            ("cpu_ms_per_mib", String(format: "%.3f", mib > 0 ? cpu * 1000 / mib : 0)),
            ("rps", String(format: "%.1f", Double(self.requests) / max(self.usage.wall, 1e-9))),
        ] + latency + [
            ("requests", "\(self.requests)"),
            ("errors", "\(self.errors)"),
        ] + (!self.isOpenLoop ? [] : [
            ("offered", "\(self.offered.load(ordering: .relaxed))"), ("unfinished", "\(self.unfinished)"),
        ]) + (self.firstError.map { [("first_error", "\"\($0.replacingOccurrences(of: "\"", with: "'"))\"")] } ?? []) + [
            ("cpu_user_s", String(format: "%.3f", self.usage.user)),
            ("cpu_sys_s", String(format: "%.3f", self.usage.sys)),
            ("cpu_us_per_rpc", String(format: "%.2f", (self.usage.user + self.usage.sys) * 1e6 / Double(requests))),
            ("cpu_util", String(format: "%.3f", (self.usage.user + self.usage.sys) / max(self.usage.wall, 1e-9))),
            ("allocations_per_rpc", String(format: "%.2f", Double(self.allocations) / Double(requests))),
            ("max_rss_kb", "\(self.maxRSS)"),
            ("rss_kb", "\(Perf.rssKB())"),
            ("os_threads", "\(Perf.threads())"),
        ]
        return "{" + fields.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}"
    }

    func distribution() -> String {
        var text = ""
        self.histogram.outputPercentileDistribution(to: &text, outputValueUnitScalingRatio: 1.0)
        return text
    }
}
