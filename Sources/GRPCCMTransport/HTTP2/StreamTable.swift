/// The open streams of one connection by id, for nghttp2's callbacks: open addressing on the id's sequence number.
///
/// A client's stream ids are odd and rise by two, so `id >> 1` puts consecutive streams in consecutive slots and a
/// lookup is a shift, a mask and a compare. A `Dictionary` hashed every id with SipHash: about 75 instructions each,
/// six times per call. Linear probing with backward-shift deletion (no tombstones); at most half full. Consecutive
/// ids make one long run of slots, which backward shifting would walk to its end on every removal: it is skipped
/// while no entry sits away from its home slot (then emptying a slot breaks no probe sequence).
struct StreamTable {
    private struct Entry {
        /// 0: empty (no stream has id 0).
        var id: Int32
        /// Bytes the handler consumed that nghttp2 has not been told of yet (`addConsumed`).
        var unreported: Int32 = 0
        /// The socket output's mark when the stream was submitted (`HTTP2Socket.outputMark`).
        var mark = 0
        var handler: HTTP2StreamHandler?
    }

    /// A power of two long, or empty before the first stream.
    private var entries: [Entry] = []
    private(set) var count = 0
    /// Entries not in their home slot (pushed on by a collision).
    private var displaced = 0

    var isEmpty: Bool { self.count == 0 }

    /// The open streams' ids and the marks they were inserted with (not for a hot path: it allocates).
    var marks: [(id: Int32, mark: Int)] { self.entries.compactMap { $0.handler == nil ? nil : ($0.id, $0.mark) } }

    @inline(__always)
    private func home(_ id: Int32) -> Int { Int(id >> 1) & (self.entries.count - 1) }

    @inline(__always)
    private func next(_ slot: Int) -> Int { (slot + 1) & (self.entries.count - 1) }

    /// The slot that holds `id`, or nil.
    @inline(__always)
    private func slot(of id: Int32) -> Int? {
        guard self.count > 0 else { return nil }
        var slot = self.home(id)
        while true {
            let found = self.entries[slot].id
            if found == id { return slot }
            if found == 0 { return nil }
            slot = self.next(slot)
        }
    }

    subscript(id: Int32) -> HTTP2StreamHandler? {
        guard let slot = self.slot(of: id) else { return nil }
        return self.entries[slot].handler
    }

    /// The handler of stream `id`, not retained: valid for as long as the table (or whoever it hands the handler to
    /// on removal) keeps it. What nghttp2's callbacks use: no retain and release per callback.
    @inline(__always)
    func unretained(_ id: Int32) -> Unmanaged<HTTP2StreamHandler>? {
        guard let slot = self.slot(of: id) else { return nil }
        return self.entries[slot].handler.map { Unmanaged.passUnretained($0) }
    }

    /// The handler of stream `id` consumed `bytes` more. Returns what to report to nghttp2 now: everything not yet
    /// reported once it reaches `batch`, else nil (also for a stream no longer here).
    mutating func addConsumed(_ bytes: Int, to id: Int32, batch: Int) -> Int? {
        guard let slot = self.slot(of: id) else { return nil }
        let total = Int(self.entries[slot].unreported) + bytes
        if total < batch {
            self.entries[slot].unreported = Int32(total)
            return nil
        }
        self.entries[slot].unreported = 0
        return total
    }

    mutating func insert(_ handler: HTTP2StreamHandler, for id: Int32, mark: Int = 0, unreported: Int32 = 0) {
        precondition(id > 0, "stream ids are positive")
        if (self.count + 1) * 2 > self.entries.count { self.resize(to: max(2, self.entries.count * 2)) }
        var slot = self.home(id)
        while self.entries[slot].id != 0 && self.entries[slot].id != id { slot = self.next(slot) }
        if self.entries[slot].id == 0 {
            self.count += 1
            if slot != self.home(id) { self.displaced += 1 }
        }
        self.entries[slot] = Entry(id: id, unreported: unreported, mark: mark, handler: handler)
    }

    /// Removes the stream and returns its handler (nil when it was not there).
    mutating func remove(_ id: Int32) -> HTTP2StreamHandler? {
        guard let slot = self.slot(of: id) else { return nil }
        // Moved out (not copied, then overwritten): a retain and a release less.
        let removed = self.entries[slot].handler.take()
        self.count -= 1
        if slot != self.home(id) { self.displaced -= 1 }
        if self.displaced == 0 {
            self.entries[slot].id = 0
            self.entries[slot].unreported = 0
            return removed
        }
        // Close the gap: a later entry of the same run moves back into the hole unless its home slot lies
        // (cyclically) after the hole, where a lookup starting at its home would not pass the hole.
        var hole = slot
        var probe = slot
        while true {
            probe = self.next(probe)
            let id = self.entries[probe].id
            if id == 0 { break }
            let home = self.home(id)
            let staysPut = hole <= probe ? (hole < home && home <= probe) : (hole < home || home <= probe)
            if !staysPut {
                self.entries[hole] = self.entries[probe]
                if hole == home { self.displaced -= 1 }
                hole = probe
            }
        }
        self.entries[hole] = Entry(id: 0, handler: nil)
        return removed
    }

    /// Frees the slots while no stream is open (an idle connection that once had many streams keeps nothing).
    mutating func releaseMemoryIfEmpty() {
        if self.count == 0 { self.entries = [] }
    }

    /// Empties the table; the streams it held, by id.
    mutating func removeAll() -> [(id: Int32, handler: HTTP2StreamHandler)] {
        let open = self.entries.compactMap { entry in entry.handler.map { (id: entry.id, handler: $0) } }
        self.entries = []
        self.count = 0
        self.displaced = 0
        return open.sorted { $0.id < $1.id }
    }

    private mutating func resize(to capacity: Int) {
        let old = self.entries
        self.entries = Array(repeating: Entry(id: 0, handler: nil), count: capacity)
        self.count = 0
        self.displaced = 0
        for entry in old where entry.id != 0 { self.insert(entry.handler!, for: entry.id, mark: entry.mark, unreported: entry.unreported) }
    }
}
