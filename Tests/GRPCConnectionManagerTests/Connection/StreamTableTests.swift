import Testing

@_spi(Transport) @testable import GRPCCMTransport
@testable import GRPCCMWire

/// The connection's table of open streams against a Dictionary doing the same, over patterns a connection meets:
/// ids in order with early and late closes, ids far apart that share a home slot, and growth past many streams.
@Suite("Stream table")
struct StreamTableTests {
    final class Handler: HTTP2StreamHandler {
        let id: Int32
        init(_ id: Int32) { self.id = id }
        override func streamReadRequest(into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool) -> RequestBodyRead {
            .waiting
        }
        override func streamWriteRequest(length: Int, to sink: (UnsafeRawBufferPointer) -> Void) -> Bool { false }
        override func streamHeader(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) -> Bool { true }
        override func streamHeadersEnded(endStream: Bool) {}
        override func streamData(_ bytes: UnsafeRawBufferPointer) -> Int { bytes.count }
        override func streamDataEndedStream() {}
        override func streamClosed(errorCode: UInt32) {}
        override func streamFailed(_ reason: CallStatus, unprocessed: Bool) {}
    }

    /// Applies the same steps to the table and to a Dictionary and checks every id ever used after each step.
    func check(_ steps: [(insert: Bool, id: Int32)]) {
        var table = StreamTable()
        var model: [Int32: Handler] = [:]
        var used = Set<Int32>()
        for step in steps {
            used.insert(step.id)
            if step.insert {
                let handler = Handler(step.id)
                table.insert(handler, for: step.id)
                model[step.id] = handler
            } else {
                let removed = table.remove(step.id)
                #expect((removed as? Handler)?.id == model.removeValue(forKey: step.id)?.id)
            }
            #expect(table.count == model.count)
            for id in used { #expect((table[id] as? Handler)?.id == model[id]?.id, "id \(id)") }
        }
        let open = table.removeAll()
        #expect(open.map(\.id) == model.keys.sorted())
        #expect(table.isEmpty && table[1] == nil)
    }

    @Test("consumed bytes are reported in batches, per stream, and survive the table's growth")
    func consumedBatches() {
        var table = StreamTable()
        table.insert(Handler(1), for: 1)
        table.insert(Handler(3), for: 3)
        #expect(table.addConsumed(100, to: 1, batch: 1_000) == nil)
        #expect(table.addConsumed(500, to: 3, batch: 1_000) == nil)
        #expect(table.addConsumed(899, to: 1, batch: 1_000) == nil)
        // Growth (8 slots, then 16) moves every entry: what is unreported moves with it.
        for id in stride(from: Int32(5), through: 15, by: 2) { table.insert(Handler(id), for: id) }
        #expect(table.addConsumed(1, to: 1, batch: 1_000) == 1_000, "999 + 1 reaches the batch: all of it is due")
        #expect(table.addConsumed(1, to: 1, batch: 1_000) == nil, "and the count starts again")
        #expect(table.addConsumed(600, to: 3, batch: 1_000) == 1_100)
        _ = table.remove(3)
        #expect(table.addConsumed(5_000, to: 3, batch: 1_000) == nil, "a stream that is gone reports nothing")
        #expect(table.addConsumed(5_000, to: 17, batch: 1_000) == nil)
    }

    @Test("odd ids in order, closed out of order, across growth and shrinking")
    func sequentialIDs() {
        var generator = SystemRandomNumberGenerator()
        var steps: [(Bool, Int32)] = []
        var open: [Int32] = []
        var next: Int32 = 1
        for _ in 0..<3_000 {
            if open.count < 100 && (open.isEmpty || Bool.random(using: &generator)) {
                steps.append((true, next))
                open.append(next)
                next += 2
            } else {
                let index = Int.random(in: 0..<open.count, using: &generator)
                steps.append((false, open.remove(at: index)))
            }
        }
        self.check(steps.map { (insert: $0.0, id: $0.1) })
    }

    @Test("ids that share a home slot (a long stream among many short ones), and removing what is not there")
    func collidingIDs() {
        // With 8 slots, ids 1, 17, 33, 49 have the same home; removing from the middle of the run shifts the rest.
        let ids: [Int32] = [1, 17, 33, 49, 3, 19, 15, 31]
        var steps = ids.map { (insert: true, id: $0) }
        steps += [(false, 17), (false, 5), (false, 1), (true, 65), (false, 49), (false, 49), (true, 17), (false, 33)]
        self.check(steps)
    }
}
