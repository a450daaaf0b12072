/// The outcomes a failure-rate breaker looks at: the last N calls, or the calls of the last N seconds (kept as
/// one-second buckets, as resilience4j does).
struct SlidingWindow {
    private let kind: CircuitBreakerConfiguration.SlidingWindowKind
    private var ring: [Bool] = []
    private var ringNext = 0
    private var buckets: [(second: UInt64, total: Int, failures: Int)] = []

    init(_ kind: CircuitBreakerConfiguration.SlidingWindowKind) {
        self.kind = kind
    }

    /// The window's size in calls for a count-based window.
    var capacityLimit: Int? {
        if case .count(let size) = self.kind { return size }
        return nil
    }

    mutating func record(failed: Bool, now: UInt64) {
        switch self.kind {
        case .count(let size):
            if self.ring.count < size {
                self.ring.append(failed)
            } else {
                self.ring[self.ringNext] = failed
                self.ringNext = (self.ringNext + 1) % size
            }
        case .time(let seconds):
            let second = now / 1_000_000_000
            self.buckets.removeAll { second &- $0.second >= UInt64(seconds) }
            if let last = self.buckets.indices.last, self.buckets[last].second == second {
                self.buckets[last].total += 1
                self.buckets[last].failures += failed ? 1 : 0
            } else {
                self.buckets.append((second, 1, failed ? 1 : 0))
            }
        }
    }

    func counts(now: UInt64) -> (total: Int, failures: Int) {
        switch self.kind {
        case .count:
            return (self.ring.count, self.ring.filter { $0 }.count)
        case .time(let seconds):
            let second = now / 1_000_000_000
            let live = self.buckets.filter { second &- $0.second < UInt64(seconds) }
            return (live.reduce(0) { $0 + $1.total }, live.reduce(0) { $0 + $1.failures })
        }
    }
}
