/// Something that can wait in a `WaitQueue`: it knows whether it is still waiting, so that an entry it left (it
/// ended, or its attempt timed out) is skipped instead of searched for and removed.
package protocol WaitQueueEntry: AnyObject {
    var queued: Bool { get set }
}

/// The calls that wait for a stream, first in first out, bounded by `capacity` (`maxQueuedCalls`). A pure value: no
/// reactor, no connections, so its rules are tested alone.
///
/// Leaving is O(1) amortised: `withdraw` marks the entry and the count drops at once; the entry itself is skipped
/// when it reaches the front, or dropped once withdrawn entries are most of the storage. Only entries still waiting
/// count against the capacity.
package struct WaitQueue<Entry: WaitQueueEntry> {
    private var entries: [Entry] = []
    private var head = 0
    /// Entries still waiting.
    package private(set) var count = 0
    package let capacity: Int

    package init(capacity: Int) {
        self.capacity = capacity
    }

    package var isEmpty: Bool { self.count == 0 }

    /// Adds `entry` at the back. False (and nothing added) when `capacity` entries already wait.
    package mutating func enqueue(_ entry: Entry) -> Bool {
        guard self.count < self.capacity else { return false }
        precondition(!entry.queued, "entry queued twice")
        entry.queued = true
        self.entries.append(entry)
        self.count += 1
        return true
    }

    /// Puts `entry` back at the front (it could not be served after all).
    package mutating func requeueFirst(_ entry: Entry) {
        precondition(!entry.queued, "entry queued twice")
        entry.queued = true
        if self.head > 0 {
            self.head -= 1
            self.entries[self.head] = entry
        } else {
            self.entries.insert(entry, at: 0)
        }
        self.count += 1
    }

    /// `entry` stops waiting; it stays in storage until it reaches the front, or until withdrawn entries are most of
    /// the storage: then they are dropped. Otherwise a queue that is never served (every stream hung on a stalled
    /// server) would keep every call that waited and timed out in it, with its request and completion, for as long
    /// as the stall lasts and after.
    package mutating func withdraw(_ entry: Entry) {
        guard entry.queued else { return }
        entry.queued = false
        self.count -= 1
        self.compact()
    }

    /// Entries held in storage, waiting or withdrawn (for tests: what `withdraw` keeps alive).
    package var storedCount: Int { self.entries.count - self.head }

    /// The first entry still waiting, taken out.
    package mutating func dequeue() -> Entry? {
        while self.head < self.entries.count {
            let entry = self.entries[self.head]
            self.head += 1
            if entry.queued {
                entry.queued = false
                self.count -= 1
                self.compact()
                return entry
            }
        }
        self.compact()
        return nil
    }

    /// Every entry still waiting, taken out, in order.
    package mutating func removeAll() -> [Entry] {
        var waiting: [Entry] = []
        while let entry = self.dequeue() { waiting.append(entry) }
        return waiting
    }

    /// Lets go of what storage holds for nothing: the entries already taken from the front, and the withdrawn ones
    /// once they are most of it.
    private mutating func compact() {
        if self.head == self.entries.count {
            self.entries.removeAll(keepingCapacity: true)
            self.head = 0
        } else if self.entries.count - self.head > 2 * self.count + 32 {
            self.entries.removeSubrange(0..<self.head)
            self.entries.removeAll { !$0.queued }
            self.head = 0
        } else if self.head > 256 && self.head * 2 > self.entries.count {
            self.entries.removeFirst(self.head)
            self.head = 0
        }
    }
}
