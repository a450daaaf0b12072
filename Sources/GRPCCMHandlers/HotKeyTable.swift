/// The handlers' per-service (or per-service-and-method) state, with the last key it was asked for remembered.
///
/// Calls of one service and method come back to back, and their strings usually share storage (the caller's path
/// and the pool's service name), so comparing with the last key is a pointer comparison, where a dictionary
/// lookup hashes every byte of both strings: callgrind showed the breaker's and the throttle's lookups among the
/// costliest steps of a call.
///
/// The dictionary is only made when a second key arrives: while the table holds one key (a channel's one service and
/// method, the usual case) that key is `lastKey`, and an idle channel carries no dictionary storage (about 150 bytes
/// each).
package struct HotKeyTable<Key: Hashable, Value> {
    private var values: [Value] = []
    /// Every key's slot once there are two keys or more; empty before.
    private var index: [Key: Int] = [:]
    private var lastKey: Key?
    private var lastSlot = 0

    package init() {}

    /// The slot of `key`, created with `make()` when absent.
    package mutating func slot(for key: Key, orInsert make: () -> Value) -> Int {
        if let slot = self.existingSlot(for: key) { return slot }
        if self.values.count == 1, let only = self.lastKey {
            // The second key: the first one, so far only `lastKey`, goes into the index too.
            self.index[only] = self.lastSlot
        }
        self.values.append(make())
        let slot = self.values.count - 1
        if slot > 0 { self.index[key] = slot }
        self.lastKey = key
        self.lastSlot = slot
        return slot
    }

    /// The slot of `key`: its own while the table holds fewer than `limit` keys, else (for a key not seen before)
    /// the slot of `overflow`, made when absent. Bounds a table whose keys come from outside (method paths a
    /// gateway passes through): past the limit, new keys share one slot instead of growing the table for good.
    package mutating func slot(
        for key: Key, limit: Int, overflow: @autoclosure () -> Key, orInsert make: () -> Value
    ) -> Int {
        if let slot = self.existingSlot(for: key) { return slot }
        if self.values.count >= limit { return self.slot(for: overflow(), orInsert: make) }
        return self.slot(for: key, orInsert: make)
    }

    /// Keys held (each with its slot).
    package var count: Int { self.values.count }

    /// The slot of the key asked for last, when `matches` finds it is the one wanted; nil otherwise (then ask with
    /// the key). For a caller that holds its key in parts: building the key copies each part, a retain and a release
    /// of each string, where `matches` compares them in place. `mutating` though it changes nothing: called on a
    /// class's stored table, a non-mutating method gets a copy of the table (and of the key). Callers write
    /// `lastSlot(where:) ?? slot(for:orInsert:)` themselves: a method of the table doing both measured a copy of the
    /// last key again (about 130 instructions per call).
    package mutating func lastSlot(where matches: (Key) -> Bool) -> Int? {
        guard let last = self.lastKey, matches(last) else { return nil }
        return self.lastSlot
    }

    /// The slot of `key`, or nil.
    package mutating func existingSlot(for key: Key) -> Int? {
        if let last = self.lastKey, last == key { return self.lastSlot }
        guard !self.index.isEmpty, let slot = self.index[key] else { return nil }
        self.lastKey = key
        self.lastSlot = slot
        return slot
    }

    package subscript(slot: Int) -> Value {
        get { self.values[slot] }
        _modify { yield &self.values[slot] }
    }
}
