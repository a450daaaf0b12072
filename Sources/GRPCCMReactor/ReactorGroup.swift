import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A fixed set of event loops, each on a thread of its own: one per core by default. A `ConnectionManager` or a
/// `GRPCChannel` made on a group spreads its work over the loops.
///
/// How work is spread, and what it costs: every loop gets its own connections to each target a channel serves
/// (`connectionsPerTarget` per address per loop), its own call queue, and its own copy of the handlers (circuit
/// breaker state, retry throttle, metric caches). A call runs on one loop from start to completion: the loop of the
/// thread that starts it when that is one of the group's (so a completion that starts the next call stays where it
/// is, with no hop and no lock), else the next loop in turn. The price is N connections per target instead of one,
/// and a breaker and throttle per loop, each seeing its share of the calls.
///
/// (Named so that it does not collide with SwiftNIO's `EventLoopGroup` when both are imported.)
public final class ReactorGroup: Sendable {
    /// The loops, each running on its own thread.
    public let loops: [ReactorLoop]
    private let cursor = Atomic<Int>(0)

    /// Starts `loopCount` loops (default: one per online core, at least one).
    /// - Throws: `ReactorError` when the kernel refuses an epoll fd or an eventfd.
    public init(loopCount: Int = ReactorGroup.onlineCores) throws {
        var loops: [ReactorLoop] = []
        do {
            for _ in 0..<max(loopCount, 1) {
                let loop = try ReactorLoop()
                loops.append(loop)  // shut down below if its thread cannot be made: it owns epoll and eventfd fds
                try loop.reactor.startThread()
            }
        } catch {
            // The loops already running would run on for the process's life, each with its thread and fds.
            for loop in loops { loop.shutdown() }
            throw error
        }
        self.loops = loops
    }

    /// Online cores, as the kernel counts them.
    public static var onlineCores: Int { max(Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), 1) }

    /// The loop of the calling thread when it is one of the group's, else the next loop in turn.
    public func next() -> ReactorLoop {
        if let current = self.current { return current }
        let index = self.cursor.add(1, ordering: .relaxed).oldValue
        return self.loops[index % self.loops.count]
    }

    /// The group's loop whose thread is calling, if any.
    public var current: ReactorLoop? {
        self.loops.first { $0.inEventLoop }
    }

    /// Shuts every loop down (see `ReactorLoop.shutdown()`), waiting for each when called on a thread that is no
    /// loop's; on a loop's thread (this group's or another's) it stops them all and returns at once.
    public func shutdown() {
        for loop in self.loops { loop.shutdown() }
    }
}
