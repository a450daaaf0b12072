// Event-bus publish cost: 0, 1 and 4 subscribers; nanoseconds per event and heap allocations per event.
//   swift run -c release bus-bench [events]
// The allocation count comes from CMallocCounter, which interposes malloc for this process only.
import CMallocCounter
@_spi(Reactor) import GRPCConnectionManager

#if canImport(Glibc)
import Glibc
#endif

final class Counter: @unchecked Sendable {
    // `@unchecked`: touched by the single benchmark thread only.
    var value = 0
}

let events = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 5_000_000 : 5_000_000
let reactor = try Reactor()  // not running: publish is called on this thread, as the reactor thread would
let service = "bench.Service"
let path = "/bench.Service/Call"
let ok = Status(code: .ok)

print("| subscribers | ns per event | allocations per event |")
print("| --- | --- | --- |")
for subscriberCount in [0, 1, 4] {
    let bus = EventBus(reactor: reactor)
    let counter = Counter()
    for _ in 0..<subscriberCount {
        bus.subscribe { event in
            if case .callFinished(_, _, let status, _, _, _, _) = event, status.isOK { counter.value &+= 1 }
        }
    }
    // Warm up, then measure.
    for index in 0..<10_000 {
        bus.publish(.callFinished(service: service, path: path, status: ok, duration: .nanoseconds(index), attempts: 1, sentBytes: 0, receivedBytes: 0))
    }
    let allocationsBefore = cmc_allocations()
    let start = Reactor.clock()
    for index in 0..<events {
        bus.publish(.callFinished(service: service, path: path, status: ok, duration: .nanoseconds(index), attempts: 1, sentBytes: 0, receivedBytes: 0))
    }
    let elapsed = Reactor.clock() - start
    let allocations = cmc_allocations() - allocationsBefore
    let perEvent = Double(elapsed) / Double(events)
    let allocationsPerEvent = Double(allocations) / Double(events)
    print("| \(subscriberCount) | \(String(format: perEvent)) | \(allocationsPerEvent) |")
    precondition(counter.value == (events + 10_000) * subscriberCount, "every subscriber saw every event")
}

func String(format value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    return "\(hundredths / 100).\(hundredths % 100 < 10 ? "0" : "")\(hundredths % 100)"
}
