/// The live calls of a router, as an intrusive doubly-linked list through the calls themselves: adding and removing
/// cost a few pointer writes and no allocation, and closing a channel finds every call, wherever it waits (queued,
/// on a stream, between attempts). The list holds each call strongly until it is removed. Reactor thread only.
package struct CallRegistry {
    private var head: ClientCall?
    package private(set) var count = 0

    package init() {}

    // The links are moved with `swap`, never copied: a copy of a reference is a retain, and the release of the
    // reference it replaces follows (two pairs fewer per call than assignments).

    package mutating func insert(_ call: ClientCall) {
        precondition(call.registryNext == nil && call.registryPrevious == nil && self.head !== call, "call registered twice")
        var link: ClientCall? = call
        swap(&self.head, &link)
        // `link`: the old head, which becomes the call's successor.
        link?.registryPrevious = Unmanaged.passUnretained(call)
        swap(&call.registryNext, &link)
        self.count += 1
    }

    package mutating func remove(_ call: ClientCall) {
        let previous = call.registryPrevious
        guard previous != nil || self.head === call else { return }  // not in this registry
        call.registryPrevious = nil
        var link: ClientCall? = nil
        swap(&link, &call.registryNext)
        // `link`: the call's successor, which takes its place.
        link?.registryPrevious = previous
        if let previous {
            previous._withUnsafeGuaranteedRef { swap(&$0.registryNext, &link) }
        } else {
            swap(&self.head, &link)
        }
        // `link`: the list's reference to the call, let go of here (the caller holds the call too).
        self.count -= 1
    }

    /// Every call, oldest last. The list itself is left as it is: ending each call removes it.
    package var all: [ClientCall] {
        var calls: [ClientCall] = []
        calls.reserveCapacity(self.count)
        var cursor = self.head
        while let call = cursor {
            calls.append(call)
            cursor = call.registryNext
        }
        return calls
    }
}
