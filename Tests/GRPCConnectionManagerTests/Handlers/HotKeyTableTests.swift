import Testing

@testable import GRPCCMHandlers

/// The handlers' keyed state against a Dictionary doing the same: one key (no index kept), a second key arriving
/// (the first moves into the index), and random traffic over a few keys.
@Suite("HotKeyTable")
struct HotKeyTableTests {
    @Test("slots by key match a Dictionary's, from the first key through the second to many; so does the fast path")
    func matchesADictionary() {
        var generator = SystemRandomNumberGenerator()
        for keyCount in 1...6 {
            var table = HotKeyTable<String, Int>()
            var model: [String: Int] = [:]
            var made = 0
            var lastAsked: String? = nil
            for _ in 0..<400 {
                let key = "/svc.S/M\(Int.random(in: 0..<keyCount, using: &generator))"
                // The fast path answers for the key asked for last only, and then with that key's slot.
                if let slot = table.lastSlot(where: { $0 == key }) {
                    #expect(lastAsked == key, "\(key): the last key asked for was \(String(describing: lastAsked))")
                    #expect(table[slot] == model[key], "\(key)")
                } else {
                    #expect(lastAsked != key || model[key] == nil, "\(key): asked for last, yet no fast answer")
                }
                if Bool.random(using: &generator) {
                    let slot = table.slot(for: key) {
                        made += 1
                        return made
                    }
                    if model[key] == nil { model[key] = made }
                    #expect(table[slot] == model[key], "\(key)")
                    table[slot] += 1000
                    model[key]! += 1000
                    lastAsked = key
                } else if let slot = table.existingSlot(for: key) {
                    #expect(table[slot] == model[key], "\(key)")
                    lastAsked = key
                } else {
                    #expect(model[key] == nil, "\(key) is in the table")
                }
            }
            #expect(made == model.count, "a value is made once per key")
        }
    }

    @Test("with a limit, keys past it share the overflow key's slot; keys already in keep theirs")
    func limit() {
        var table = HotKeyTable<String, String>()
        func slot(_ key: String) -> Int { table.slot(for: key, limit: 3, overflow: "other") { key } }
        let own = ["a", "b", "c"].map(slot)
        #expect(Set(own).count == 3)
        let d = slot("d")
        let e = slot("e")
        #expect(d == e && !own.contains(d), "new keys past the limit share one slot of their own")
        #expect(table.existingSlot(for: "other") == d, "the overflow key's")
        #expect(table.existingSlot(for: "d") == nil, "no slot for the key itself")
        #expect(slot("b") == own[1], "a key already in keeps its slot")
        #expect(table.count == 4)
    }
}
