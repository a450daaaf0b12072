/// The outcomes a failure-rate breaker looks at: the last N calls, or the calls of the last N seconds (kept as
/// one-second buckets, as resilience4j does).
///
/// Both keep running totals, so recording an outcome and reading the counts cost the same whatever the window's
/// size: this runs on the loop thread at every call's end, and a window of 100,000 calls or a day of seconds is a
/// valid configuration.
struct SlidingWindow {
    private struct Bucket {
        var second: UInt64
        var total: Int
        var failures: Int
    }

    private let kind: CircuitBreakerConfiguration.SlidingWindowKind
    /// Count-based: the last `size` outcomes, `ringNext` the oldest once full.
    private var ring: [Bool] = []
    private var ringNext = 0
    private var ringFailures = 0
    /// Time-based: a bucket per second that had calls, oldest first from `head` (those before it have expired).
    private var buckets: [Bucket] = []
    private var head = 0
    private var bucketTotal = 0
    private var bucketFailures = 0

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
                if self.ring[self.ringNext] { self.ringFailures -= 1 }
                self.ring[self.ringNext] = failed
                self.ringNext = (self.ringNext + 1) % size
            }
            if failed { self.ringFailures += 1 }
        case .time(let seconds):
            let second = now / 1_000_000_000
            self.dropExpired(at: second, window: UInt64(seconds))
            if self.head < self.buckets.count, self.buckets[self.buckets.count - 1].second == second {
                self.buckets[self.buckets.count - 1].total += 1
                self.buckets[self.buckets.count - 1].failures += failed ? 1 : 0
            } else {
                self.buckets.append(Bucket(second: second, total: 1, failures: failed ? 1 : 0))
            }
            self.bucketTotal += 1
            self.bucketFailures += failed ? 1 : 0
        }
    }

    func counts(now: UInt64) -> (total: Int, failures: Int) {
        switch self.kind {
        case .count:
            return (self.ring.count, self.ringFailures)
        case .time(let seconds):
            // Less the buckets that expired since the last record: usually none.
            let expired = self.expired(at: now / 1_000_000_000, window: UInt64(seconds))
            return (self.bucketTotal - expired.total, self.bucketFailures - expired.failures)
        }
    }

    /// The buckets from `head` on that are older than `window` seconds at `second`: how many, and their totals.
    private func expired(at second: UInt64, window: UInt64) -> (buckets: Int, total: Int, failures: Int) {
        var index = self.head
        var total = 0
        var failures = 0
        while index < self.buckets.count, second &- self.buckets[index].second >= window {
            total += self.buckets[index].total
            failures += self.buckets[index].failures
            index += 1
        }
        return (index - self.head, total, failures)
    }

    /// Takes the buckets older than `window` seconds at `second` out of the totals; the array is compacted once
    /// the expired part is most of it.
    private mutating func dropExpired(at second: UInt64, window: UInt64) {
        let expired = self.expired(at: second, window: window)
        self.head += expired.buckets
        self.bucketTotal -= expired.total
        self.bucketFailures -= expired.failures
        if self.head == self.buckets.count {
            self.buckets.removeAll(keepingCapacity: true)
            self.head = 0
        } else if self.head >= 64 && self.head * 2 >= self.buckets.count {
            self.buckets.removeFirst(self.head)
            self.head = 0
        }
    }
}
