// Event-bus cost: publishing and dispatching, with 0, 1 and 4 subscribers; nanoseconds per event and heap
// allocations per event.
//   swift run -c release bus-bench [events]
// Events are published on the reactor thread in batches of 1,000 per loop turn (as calls publish them) and
// dispatched in the turn's deferred phase, as in the library. The allocation count comes from CMallocCounter, which
// interposes malloc for this process only.
import CMallocCounter
import Synchronization
@_spi(Reactor) import GRPCConnectionManager

#if canImport(Glibc)
import Glibc
#endif

final class Counter: @unchecked Sendable {
    // `@unchecked`: touched on the reactor thread only.
    var value = 0
}

/// Publishes `remaining` events, 1,000 per loop turn, then raises `done`.
final class Pump: ReactorHandler, @unchecked Sendable {
    // `@unchecked`: reactor thread only (started through the inbox).
    let bus: LocalEventBus
    let reactor: Reactor
    var remaining: Int
    let done = Atomic<Bool>(false)
    let service = "bench.Service"
    let path = "/bench.Service/Call"
    let ok = CallStatus(code: .ok)

    init(bus: LocalEventBus, reactor: Reactor, events: Int) {
        self.bus = bus
        self.reactor = reactor
        self.remaining = events
    }

    override func reactorRunSubmitted() { self.reactorRunDeferred() }

    override func reactorRunDeferred() {
        if self.remaining == 0 {
            // The last batch has been dispatched (the bus ran before this, in the same phase).
            self.done.store(true, ordering: .releasing)
            return
        }
        let batch = min(1000, self.remaining)
        for index in 0..<batch {
            self.bus.publish(
                .callFinished(
                    service: self.service, path: self.path, status: self.ok, duration: .nanoseconds(index),
                    attempts: 1, sentBytes: 0, receivedBytes: 0))
        }
        self.remaining -= batch
        self.reactor.enqueueDeferred(self)
    }
}

let events = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 5_000_000 : 5_000_000
let loop = try ReactorLoop()
loop.start()
let reactor = loop.reactor

func run(_ bus: LocalEventBus, events: Int) -> UInt64 {
    let pump = Pump(bus: bus, reactor: reactor, events: events)
    let start = Reactor.clock()
    reactor.submit(pump)
    while !pump.done.load(ordering: .acquiring) { usleep(100) }
    return Reactor.clock() - start
}

print("| subscribers | ns per event | allocations per event |")
print("| --- | --- | --- |")
for subscriberCount in [0, 1, 4] {
    let bus = EventBus(reactor: reactor).single
    let counter = Counter()
    for _ in 0..<subscriberCount {
        bus.subscribe(callEvents: true) { event in
            if case .callFinished(_, _, let status, _, _, _, _) = event, status.isOK { counter.value &+= 1 }
        }
    }
    _ = run(bus, events: 20_000)  // warm-up: the buffers reach their size
    let allocationsBefore = cmc_allocations()
    let elapsed = run(bus, events: events)
    let allocations = cmc_allocations() - allocationsBefore
    let perEvent = Double(elapsed) / Double(events)
    let allocationsPerEvent = Double(allocations) / Double(events)
    print("| \(subscriberCount) | \(String(format: perEvent)) | \(String(format: allocationsPerEvent)) |")
    precondition(counter.value == (events + 20_000) * subscriberCount, "every subscriber saw every event")
}
loop.shutdown()

func String(format value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    return "\(hundredths / 100).\(hundredths % 100 < 10 ? "0" : "")\(hundredths % 100)"
}
