/// The live calls of a router, as an intrusive doubly-linked list through the calls themselves: adding and removing
/// cost a few pointer writes and no allocation, and closing a channel finds every call, wherever it waits (queued,
/// on a stream, between attempts). The list holds each call strongly until it is removed. Reactor thread only.
package struct CallRegistry {
    private var head: ClientCall?
    package private(set) var count = 0

    package init() {}

    package mutating func insert(_ call: ClientCall) {
        precondition(call.registryNext == nil && call.registryPrevious == nil && self.head !== call, "call registered twice")
        call.registryNext = self.head
        self.head?.registryPrevious = call
        self.head = call
        self.count += 1
    }

    package mutating func remove(_ call: ClientCall) {
        if let previous = call.registryPrevious {
            previous.registryNext = call.registryNext
        } else {
            guard self.head === call else { return }  // not in this registry
            self.head = call.registryNext
        }
        call.registryNext?.registryPrevious = call.registryPrevious
        call.registryNext = nil
        call.registryPrevious = nil
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
