import Testing

@testable import GRPCCMTransport

/// The socket output's byte run against a `[UInt8]` doing the same, through random appends (some that grow the
/// storage), partial fills, and drops from either end.
@Suite("Output bytes")
struct OutputBytesTests {
    @Test("appends, fills and drops leave the same bytes as an Array's")
    func matchesAnArray() {
        var generator = SystemRandomNumberGenerator()
        var run = OutputBytes()
        var model: [UInt8] = []
        var next: UInt8 = 0
        func fresh(_ count: Int) -> [UInt8] {
            (0..<count).map { _ in
                next &+= 1
                return next
            }
        }
        for _ in 0..<2000 {
            switch Int.random(in: 0..<6, using: &generator) {
            case 0, 1:
                let bytes = fresh(Int.random(in: 0..<3000, using: &generator))
                bytes.withUnsafeBytes { run.append($0) }
                model += bytes
            case 2:
                // A fill that writes less than it was offered, or fails (a negative count adds nothing), or claims
                // too much.
                let offered = Int.random(in: 1..<700, using: &generator)
                let wanted = Int.random(in: -1...offered, using: &generator)
                let bytes = fresh(max(wanted, 0))
                let written = run.append(upTo: offered) { space in
                    #expect(space.count == offered)
                    space.copyBytes(from: bytes)
                    // A fill that claims more than the room it had counts as filling the room.
                    return wanted == offered ? offered + 3 : wanted
                }
                #expect(written == wanted)
                model += bytes
                // Asking for no room at all adds nothing and calls nothing.
                let none = run.append(upTo: 0) { _ in
                    Issue.record("fill called for 0 bytes")
                    return 1
                }
                #expect(none == 0)
            case 3:
                let n = Int.random(in: 0...model.count, using: &generator)
                run.removeLast(n)
                model.removeLast(n)
            case 4:
                let n = Int.random(in: 0...model.count, using: &generator)
                run.removeFirst(n)
                model.removeFirst(n)
            default:
                let keep = Bool.random(using: &generator)
                run.removeAll(keepingCapacity: keep)
                model.removeAll()
                let capacity = run.capacity  // read first: #expect cannot capture a noncopyable value
                if !keep { #expect(capacity == 0, "the storage is let go of") }
            }
            let (count, capacity) = (run.count, run.capacity)
            #expect(count == model.count)
            #expect(capacity >= count)
            let offset = Int.random(in: 0...model.count, using: &generator)
            let same = run.withUnsafeBytes(from: offset) { $0.elementsEqual(model[offset...]) }
            #expect(same, "bytes from \(offset) differ")
        }
    }
}
