/// Which connection a call goes to: the one with the fewest open streams among those that can take one now, the
/// scan starting at a rotating cursor so that ties spread. A pure value: candidates are described by a closure, so
/// picking allocates nothing and is tested without connections.
package struct LeastLoadedPicker: Sendable {
    private var cursor = 0

    package init() {}

    /// The index of the chosen candidate among `count`, or nil when none can take a stream.
    /// - Parameter candidate: For index i: whether it can take a stream now, and its load.
    package mutating func pick(count: Int, _ candidate: (Int) -> (usable: Bool, load: Int)) -> Int? {
        guard count > 0 else { return nil }
        if count == 1 { return candidate(0).usable ? 0 : nil }
        self.cursor = (self.cursor + 1) % count
        var best: Int?
        var bestLoad = Int.max
        for offset in 0..<count {
            let index = (self.cursor + offset) % count
            let (usable, load) = candidate(index)
            if usable && load < bestLoad {
                best = index
                bestLoad = load
            }
        }
        return best
    }
}
