@_spi(Transport) import GRPCCMTransport
import GRPCCMCompression
@_spi(Reactor) import GRPCCMReactor
import GRPCCMWire

/// One piece of a streaming response, in the order the application sees them: `.metadata` (unless the response
/// is trailers-only), any number of `.message`, then exactly one `.end`.
package enum ResponsePart: Sendable {
    case metadata(CallMetadata)
    case message([UInt8])
    case end(StreamResult)
}

/// A received piece as the inbox holds it: a part ready for the reader, or a message kept compressed because more
/// than the limit already waited unread. Such a message was checked when it arrived (it inflates, within the
/// receive limit, to `inflatedSize` bytes) and is inflated when the reader takes it: a slow reader's backlog then
/// holds the bytes the server sent, not up to a thousand times as many (deflate's best ratio).
enum Inbound {
    case part(ResponsePart)
    case compressed([UInt8], CallCompression, inflatedSize: Int)
    /// Only in the inbox: the next `count` messages are back to back in `State.packed` (see `StreamBuffers`).
    case packed(count: Int)
}

/// The part of a streaming call that application threads touch: messages written but not yet taken by nghttp2,
/// responses received but not yet read, and whoever waits on either.
///
/// Backpressure both ways:
/// - **Out**: `write` adds to `outbox`; nghttp2 pulls from it only while the stream's and the connection's
///   send windows allow. A writer is told to wait (suspended, or `isWritable` false until `onWritable`) while more
///   than `limit` bytes are buffered, so a fast writer and a slow peer cost at most `limit` plus one message.
/// - **In** (buffered delivery): received bytes are returned to the peer's send window (`nghttp2_session_consume_stream`)
///   only while fewer than `limit` bytes wait unread. Above that the peer runs out of window after at most one
///   stream window more, so a slow reader holds at most `limit` + the stream window + one partial message.
///
/// Unread messages are counted as memory, not as wire bytes, so that tiny messages are bounded too (an empty one
/// is 5 bytes on the wire): below the limit each has an inbox entry of its own and is charged `entryCost` more;
/// past it (the stream window's worth the peer may still send) small ones are packed back to back into one array,
/// each behind a 5-byte record header (13 when compressed), as they came. A message of `packedMessageLimit` bytes
/// or more keeps an entry of its own past the limit too: its overhead is small, and packing would copy it twice.
///
/// The reactor reaches this state once per nghttp2 callback, application threads once per write or read.
/// `@unchecked Sendable`: every mutable field lives in `state`, which is only touched under its lock.
package final class StreamBuffers: @unchecked Sendable {
    struct State {
        // Out.
        var outbox: [[UInt8]] = []
        var outboxHead = 0
        /// Bytes of the head message (5-byte prefix included) already handed to nghttp2.
        var headOffset = 0
        /// Framed bytes written and not yet handed to nghttp2.
        var outboxBytes = 0
        var halfClosed = false
        /// nghttp2 has taken at least one byte of a message (the stream can no longer be replayed).
        var sendStarted = false
        var writeWaiters: [CheckedContinuation<Void, any Error>] = []
        /// A callback writer saw `isWritable` false: `onWritable` fires when the buffer drains.
        var owesWritable = false
        // In.
        var inbox: [Inbound] = []
        var inboxHead = 0
        /// What unread messages cost, as they are held (compressed ones as they came): bytes plus `entryCost` for
        /// an entry of their own, bytes plus the record header when packed.
        var inboxBytes = 0
        /// Messages that arrived past the limit, as records: a 4-byte length (little-endian), an encoding byte (0
        /// for none, else `CallCompression.allCases` index + 1) and, when compressed, the 8-byte inflated size;
        /// then the bytes. Read from `packedHead`.
        var packed: [UInt8] = []
        var packedHead = 0
        /// Received bytes not yet returned to the peer's window.
        var unconsumed = 0
        var readWaiter: CheckedContinuation<Inbound, Never>?
        // Both.
        var result: StreamResult?
        /// The call's end as the loop learned it, before its delivery (`finish`) in the deferred phase: writes are
        /// refused from then on, and a reader that has taken every message is done.
        var ending: StreamResult?
        /// The call's end as far as anyone here knows: delivered, or learned on the loop and still to be delivered.
        var ended: StreamResult? { self.result ?? self.ending }
        var resultWaiters: [CheckedContinuation<StreamResult, Never>] = []
        var wakePending = false
    }

    /// What an unread message with an inbox entry of its own costs beyond its framed bytes: the entry, and its
    /// array's header and allocation (32 bytes, rounded up by malloc).
    static let entryCost = MemoryLayout<Inbound>.stride + 48
    /// Messages this size or larger are never packed (see the type's note).
    static let packedMessageLimit = 1024
    /// What a slot of the inbox holds once read: nothing (a record count of 0 allocates nothing).
    private static let readSlot = Inbound.packed(count: 0)
    /// Read (or sent) slots at the front of the inbox (or outbox) are removed in bulk once there are this many and
    /// they are half the array: each removal moves the unread rest, so it is done rarely.
    static let compactionSlots = 256

    /// Whether the requests were half-closed (END_STREAM queued after them).
    package var requestsClosed: Bool { self.state.withLock { $0.halfClosed } }

    /// Slots of the inbox and the outbox, read and sent ones included (for tests).
    package var slots: (inbox: Int, outbox: Int) { self.state.withLock { ($0.inbox.count, $0.outbox.count) } }

    package let limit: Int
    package let maxSendMessageSize: Int
    /// How written messages are compressed: on the writer's thread, before they are buffered.
    package let requestEncoding: CallCompression
    private let state = PThreadLock(State())
    /// Inflates the messages kept compressed, on the reader's thread; made on first use.
    private let inflater = PThreadLock<MessageDecompressor?>(nil)
    /// Set by the call when it is created; the waker reaches it on the reactor thread.
    package let waker = StreamWaker()

    package init(limit: Int, maxSendMessageSize: Int, requestEncoding: CallCompression = .identity) {
        self.limit = limit
        self.maxSendMessageSize = maxSendMessageSize
        self.requestEncoding = requestEncoding
    }

    // MARK: application side

    package enum WriteOutcome {
        /// Buffered; the writer may go on.
        case accepted
        /// Buffered, but the buffer is full: wait before writing more.
        case acceptedFull
        /// Dropped: the requests were closed, or the call ended.
        case refused(CallError)
    }

    /// Why a write after the call's end is refused: its status, or, when the server ended it OK (a server may answer
    /// before the client half-closes), that it has ended: an error carrying OK would read as no error at all.
    private static func writeRefusal(_ result: StreamResult) -> CallError {
        guard result.status.isOK else { return CallError(status: result.status, trailers: result.trailingMetadata) }
        return CallError(
            status: CallStatus(code: .failedPrecondition, message: "the call has already ended (OK): no more requests are sent"),
            trailers: result.trailingMetadata)
    }

    package static let cancelledWriter = CallError(
        status: CallStatus(code: .cancelled, message: "the writing task was cancelled: the call is cancelled"))

    /// Why a write is refused now, if it is: the call ended, or the requests were closed.
    private static func refusal(_ state: State) -> CallError? {
        if let result = state.ended { return Self.writeRefusal(result) }
        if state.halfClosed {
            return CallError(status: CallStatus(code: .failedPrecondition, message: "the requests were already closed"))
        }
        return nil
    }

    /// Buffers one message for sending. Any thread.
    package func write(_ message: [UInt8]) -> WriteOutcome {
        if message.count > self.maxSendMessageSize {
            // A write that would be refused anyway (after closeSend, or the end) leaves the call as it is.
            if let refusal = self.state.withLock({ Self.refusal($0) }) { return .refused(refusal) }
            let status = CallStatus(
                code: .resourceExhausted,
                message: "request message of \(message.count) bytes exceeds the send limit of \(self.maxSendMessageSize) bytes")
            self.waker.fail(status, byClient: true)
            return .refused(CallError(status: status))
        }
        let message = MessageCompressor.compress(message, with: self.requestEncoding)
        let (outcome, wake) = self.state.withLock { state -> (WriteOutcome, Bool) in
            if let refusal = Self.refusal(state) { return (.refused(refusal), false) }
            state.outbox.append(message)
            state.outboxBytes += message.count + 5
            let full = state.outboxBytes >= self.limit
            if full { state.owesWritable = true }
            return (full ? .acceptedFull : .accepted, Self.claimWake(&state))
        }
        if wake { self.waker.wake() }
        return outcome
    }

    /// Buffers `message`, then suspends while the send buffer is full; cancelling the task runs `cancel`.
    /// - Throws: `CallError` when the call has ended or the requests were closed.
    package func writeWaitingForRoom(_ message: [UInt8], cancel: @escaping @Sendable () -> Void) async throws {
        // A cancelled writer cancels the call, room or not: its requests were cut short, and the server must not take
        // what went out as all of them.
        if Task.isCancelled {
            cancel()
            throw Self.cancelledWriter
        }
        switch self.write(message) {
        case .accepted: return
        case .refused(let error): throw error
        case .acceptedFull:
            try await withTaskCancellationHandler {
                try await self.waitUntilWritable()
            } onCancel: {
                cancel()
            }
        }
    }

    /// Suspends while the send buffer is full. Returns at once when it is not; throws when the call ends.
    package func waitUntilWritable() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let resume: Result<Void, CallError>? = self.state.withLock { state in
                if let result = state.ended { return .failure(Self.writeRefusal(result)) }
                if state.outboxBytes < self.limit { return .success(()) }
                state.writeWaiters.append(continuation)
                return nil
            }
            if let resume { continuation.resume(with: resume) }
        }
    }

    package var isWritable: Bool {
        self.state.withLock { state in
            if state.ended != nil || state.halfClosed { return false }
            if state.outboxBytes >= self.limit {
                state.owesWritable = true
                return false
            }
            return true
        }
    }

    /// Half-closes the requests: END_STREAM goes out after the buffered messages. Idempotent.
    package func closeRequests() {
        let wake = self.state.withLock { state -> Bool in
            if state.halfClosed || state.result != nil { return false }
            state.halfClosed = true
            return Self.claimWake(&state)
        }
        if wake { self.waker.wake() }
    }

    /// The next response part; suspends until one arrives. After `.end` it returns `.end` again.
    package func nextPart() async -> ResponsePart {
        while true {
            switch await self.nextInbound() {
            case .part(let part):
                return part
            case .compressed(let message, let encoding, let inflatedSize):
                // Checked when it arrived, so only zlib failing to start can refuse it now: the call ends with that,
                // and the reader reads on to the end.
                let decompressor = self.inflater.withLock { $0.take() } ?? MessageDecompressor()
                defer { self.inflater.withLock { $0 = decompressor } }
                do throws(MessageDecompressor.Failure) {
                    return .message(try decompressor.decompress(message, with: encoding, limit: inflatedSize))
                } catch {
                    self.waker.fail(CallStatus(code: .internal, message: "response message could not be inflated: \(error)"))
                }
            case .packed:
                preconditionFailure("packed messages are taken out one by one (pop)")
            }
        }
    }

    private func nextInbound() async -> Inbound {
        await withCheckedContinuation { (continuation: CheckedContinuation<Inbound, Never>) in
            let (part, wake) = self.state.withLock { state -> (Inbound?, Bool) in
                guard state.inboxHead < state.inbox.count else {
                    if let result = state.result { return (.part(.end(result)), false) }
                    if state.readWaiter != nil {
                        // One reader at a time: a second one gets an error, not a wait that nothing would end.
                        let status = CallStatus(
                            code: .failedPrecondition, message: "another task is already reading this call's responses")
                        return (.part(.end(StreamResult(status: status))), false)
                    }
                    state.readWaiter = continuation
                    return (nil, false)
                }
                return Self.pop(&state, limit: self.limit)
            }
            if wake { self.waker.wake() }
            if let part { continuation.resume(returning: part) }
        }
    }

    /// The final status and metadata; suspends until the call ends.
    package func result() async -> StreamResult {
        await withCheckedContinuation { (continuation: CheckedContinuation<StreamResult, Never>) in
            let result = self.state.withLock { state -> StreamResult? in
                if let result = state.result { return result }
                state.resultWaiters.append(continuation)
                return nil
            }
            if let result { continuation.resume(returning: result) }
        }
    }

    private static func pop(_ state: inout State, limit: Int) -> (Inbound?, Bool) {
        var part = state.inbox[state.inboxHead]
        let charge: Int
        if case .packed(let count) = part {
            (part, charge) = Self.unpack(&state)
            if count > 1 {
                state.inbox[state.inboxHead] = .packed(count: count - 1)
            } else {
                state.inboxHead += 1
            }
        } else {
            // The slot lets go of what it held: a reader that never quite catches up (new messages arrive before the
            // inbox empties) kept every message it had read until then, a whole download's worth.
            state.inbox[state.inboxHead] = Self.readSlot
            state.inboxHead += 1
            switch part {
            case .part(.message(let message)), .compressed(let message, _, _): charge = message.count + 5 + Self.entryCost
            case .part, .packed: charge = 0
            }
        }
        if state.inboxHead == state.inbox.count {
            state.inbox.removeAll(keepingCapacity: true)
            state.inboxHead = 0
        } else if state.inboxHead >= Self.compactionSlots && 2 * state.inboxHead >= state.inbox.count {
            // Nor do the read slots pile up (16 bytes each) for as long as the stream lives.
            state.inbox.removeSubrange(0..<state.inboxHead)
            state.inboxHead = 0
        }
        if charge == 0 { return (part, false) }
        state.inboxBytes -= charge
        // Reopen the peer's window once the reader has caught up to under the limit.
        let wake = state.unconsumed > 0 && state.inboxBytes < limit && Self.claimWake(&state)
        return (part, wake)
    }

    /// Appends a message to the packed records (see `State.packed`), behind the inbox's last `.packed` entry.
    private static func pack(_ message: [UInt8], _ encoding: CallCompression, inflatedSize: Int, into state: inout State) {
        if state.inboxHead < state.inbox.count, case .packed(let count) = state.inbox[state.inbox.count - 1] {
            state.inbox[state.inbox.count - 1] = .packed(count: count + 1)
        } else {
            state.inbox.append(.packed(count: 1))
        }
        let start = state.packed.count
        withUnsafeBytes(of: UInt32(message.count).littleEndian) { state.packed.append(contentsOf: $0) }
        if encoding == .identity {
            state.packed.append(0)
        } else {
            state.packed.append(UInt8(CallCompression.allCases.firstIndex(of: encoding)! + 1))
            withUnsafeBytes(of: UInt64(inflatedSize).littleEndian) { state.packed.append(contentsOf: $0) }
        }
        state.packed.append(contentsOf: message)
        state.inboxBytes += state.packed.count - start
    }

    /// Takes the first packed record: the message, and what it was charged.
    private static func unpack(_ state: inout State) -> (Inbound, charge: Int) {
        let start = state.packedHead
        var at = start
        func integer<T: FixedWidthInteger>(_ type: T.Type) -> T {
            var value = T.zero
            withUnsafeMutableBytes(of: &value) { raw in
                for index in 0..<MemoryLayout<T>.size { raw[index] = state.packed[at + index] }
            }
            at += MemoryLayout<T>.size
            return T(littleEndian: value)
        }
        let length = Int(integer(UInt32.self))
        let tag = Int(state.packed[at])
        at += 1
        let inflatedSize = tag == 0 ? 0 : Int(integer(UInt64.self))
        let message = Array(state.packed[at..<(at + length)])
        at += length
        if at == state.packed.count {
            // Drained: the memory goes back (it held up to a stream window's worth).
            state.packed = []
            state.packedHead = 0
        } else if at >= 64 << 10 && 2 * at >= state.packed.count {
            state.packed.removeSubrange(0..<at)
            state.packedHead = 0
        } else {
            state.packedHead = at
        }
        let part: Inbound = tag == 0
            ? .part(.message(message))
            : .compressed(message, CallCompression.allCases[tag - 1], inflatedSize: inflatedSize)
        return (part, at - start)
    }

    private static func claimWake(_ state: inout State) -> Bool {
        if state.wakePending { return false }
        state.wakePending = true
        return true
    }

    // MARK: reactor side

    /// What the reactor must do after a wake-up.
    package struct WakeWork {
        package var resumeSending: Bool
        package var consume: Int
    }

    package func takeWakeWork() -> WakeWork {
        self.state.withLock { state in
            state.wakePending = false
            var consume = 0
            if state.inboxBytes < self.limit {
                consume = state.unconsumed
                state.unconsumed = 0
            }
            return WakeWork(resumeSending: state.outboxBytes > 0 || state.halfClosed, consume: consume)
        }
    }

    /// True when nghttp2 has not taken a byte of any message yet (the stream may be replayed elsewhere).
    package var canReplay: Bool { self.state.withLock { !$0.sendStarted } }

    /// nghttp2's data source asks for the next frame, at most `length` bytes: framed messages are copied into `buffer`
    /// now, or, when at least `RequestBodyRead.noCopyMinimum` are buffered, handed over by `write(length:to:)` when
    /// the frame goes out. `messageBytes` grows by the payload of every message that left completely (what metrics
    /// count as sent).
    package func read(
        into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool, messageBytes: inout Int
    ) -> RequestBodyRead {
        self.drain(length, .read, eof: &eof, messageBytes: &messageBytes) { message, offset, done, room in
            MessageFramer.copyFramed(
                message, compressed: self.requestEncoding != .identity, offset: &offset, into: buffer + done,
                capacity: room)
        }
    }

    /// Hands the `length` bytes a `.later` read announced to `sink`. False when they are no longer buffered (the
    /// call ended in between).
    package func write(length: Int, to sink: (UnsafeRawBufferPointer) -> Void, messageBytes: inout Int) -> Bool {
        var eof = false
        let moved = self.drain(length, .handOver, eof: &eof, messageBytes: &messageBytes) { message, offset, _, room in
            MessageFramer.emitFramed(
                message, compressed: self.requestEncoding != .identity, offset: &offset, capacity: room, to: sink)
        }
        if case .copied = moved { return true }
        return false
    }

    /// What `drain` may do with a frame: `read` answers `.later` instead of moving bytes when there are enough of
    /// them; `handOver` moves exactly the length a `.later` announced, or nothing when that many are gone.
    private enum DrainMode { case read, handOver }

    /// Takes up to `length` framed bytes from the outbox through `move` (which moves at most `room` bytes of one
    /// message from `offset` of its framed form, `done` bytes into the frame, and returns how many), under one lock,
    /// then wakes writers waiting for room.
    private func drain(
        _ length: Int, _ mode: DrainMode, eof: inout Bool, messageBytes: inout Int,
        _ move: (_ message: [UInt8], _ offset: inout Int, _ done: Int, _ room: Int) -> Int
    ) -> RequestBodyRead {
        var waiters: [CheckedContinuation<Void, any Error>] = []
        var notifyWritable = false
        var completedBytes = 0
        let result = self.state.withLock { state -> RequestBodyRead in
            switch mode {
            case .read:
                let count = min(length, state.outboxBytes)
                if count >= RequestBodyRead.noCopyMinimum {
                    eof = state.halfClosed && state.outboxBytes == count
                    return .later(count)
                }
            case .handOver:
                if state.outboxBytes < length { return .waiting }
            }
            var written = 0
            while written < length && state.outboxHead < state.outbox.count {
                let message = state.outbox[state.outboxHead]
                written += move(message, &state.headOffset, written, length - written)
                if state.headOffset == message.count + 5 {
                    completedBytes += message.count
                    state.outbox[state.outboxHead] = []
                    state.outboxHead += 1
                    state.headOffset = 0
                }
            }
            if state.outboxHead == state.outbox.count {
                state.outbox.removeAll(keepingCapacity: true)
                state.outboxHead = 0
            } else if state.outboxHead >= Self.compactionSlots && 2 * state.outboxHead >= state.outbox.count {
                // A writer that keeps the outbox topped up never empties it: the sent slots go in bulk.
                state.outbox.removeSubrange(0..<state.outboxHead)
                state.outboxHead = 0
            }
            if written > 0 { state.sendStarted = true }
            let wasFull = state.outboxBytes >= self.limit
            state.outboxBytes -= written
            if wasFull && state.outboxBytes < self.limit {
                swap(&waiters, &state.writeWaiters)
                notifyWritable = state.owesWritable
                state.owesWritable = false
            }
            eof = state.halfClosed && state.outboxBytes == 0
            return written == 0 && !eof ? .waiting : .copied(written)
        }
        messageBytes += completedBytes
        for waiter in waiters { waiter.resume() }
        if notifyWritable { self.waker.writable() }
        return result
    }

    /// Response headers (not trailers-only) arrived.
    package func deliverMetadata(_ metadata: CallMetadata) {
        let part = Inbound.part(.metadata(metadata))
        self.handOver(part) { state in state.inbox.append(part) }
    }

    /// A complete response message arrived.
    package func deliverMessage(_ message: [UInt8]) {
        self.deliver(.part(.message(message)), message, .identity, inflatedSize: 0)
    }

    /// Queues a message as it came, compressed with `encoding`, for the reader to inflate; it was checked to inflate
    /// to `inflatedSize` bytes. For when `isBacklogged`.
    package func deliverCompressedMessage(_ message: [UInt8], encoding: CallCompression, inflatedSize: Int) {
        self.deliver(.compressed(message, encoding, inflatedSize: inflatedSize), message, encoding, inflatedSize: inflatedSize)
    }

    /// Hands `part` (which is `message`) to a waiting reader, or queues it: with an entry of its own below the
    /// limit, packed past it.
    private func deliver(_ part: Inbound, _ message: [UInt8], _ encoding: CallCompression, inflatedSize: Int) {
        self.handOver(part) { state in
            if state.inboxBytes >= self.limit && message.count < Self.packedMessageLimit {
                Self.pack(message, encoding, inflatedSize: inflatedSize, into: &state)
            } else {
                state.inbox.append(part)
                state.inboxBytes += message.count + 5 + Self.entryCost
            }
        }
    }

    /// Resumes the waiting reader with `part`, or, with none waiting, runs `queue` under the lock. A part handed
    /// straight to a reader never counts as buffered.
    private func handOver(_ part: Inbound, orQueue queue: (inout State) -> Void) {
        let waiter = self.state.withLock { state -> CheckedContinuation<Inbound, Never>? in
            if let waiter = state.readWaiter {
                state.readWaiter = nil
                return waiter
            }
            queue(&state)
            return nil
        }
        waiter?.resume(returning: part)
    }

    /// More than the limit waits unread: a compressed message that arrives now is better kept compressed.
    package var isBacklogged: Bool { self.state.withLock { $0.inboxBytes >= self.limit } }

    /// `count` DATA bytes arrived. Returns how many to give back to the peer's window now; the rest waits for the
    /// reader to catch up.
    package func received(_ count: Int) -> Int {
        self.state.withLock { state in
            if state.inboxBytes < self.limit && state.unconsumed == 0 { return count }
            state.unconsumed += count
            return 0
        }
    }

    /// The call ended: record the result, fail writers, wake the reader after what it has not read yet.
    /// The call ended on the loop; `finish` delivers the end later, in the deferred phase. Writes are refused from
    /// now: one from a callback in this turn (after its own `cancel()`, say) would be accepted, then dropped.
    package func callEnded(_ result: StreamResult) {
        self.state.withLock { state in
            if state.result == nil { state.ending = result }
        }
    }

    package func finish(_ result: StreamResult) {
        let (writers, reader, resultWaiters) = self.state.withLock {
            state -> ([CheckedContinuation<Void, any Error>], CheckedContinuation<Inbound, Never>?, [CheckedContinuation<StreamResult, Never>]) in
            if state.result != nil { return ([], nil, []) }
            state.result = result
            state.outbox.removeAll()
            state.outboxHead = 0
            state.outboxBytes = 0
            var writers: [CheckedContinuation<Void, any Error>] = []
            swap(&writers, &state.writeWaiters)
            var resultWaiters: [CheckedContinuation<StreamResult, Never>] = []
            swap(&resultWaiters, &state.resultWaiters)
            let reader = state.readWaiter
            state.readWaiter = nil
            if reader == nil { state.inbox.append(.part(.end(result))) }
            return (writers, reader, resultWaiters)
        }
        // As a write after the end is refused: an OK end gives the writers FAILED_PRECONDITION, not an OK "error".
        let error = Self.writeRefusal(result)
        for writer in writers { writer.resume(throwing: error) }
        reader?.resume(returning: .part(.end(result)))
        for waiter in resultWaiters { waiter.resume(returning: result) }
    }

    /// The call has ended (its result is recorded).
    package var isFinished: Bool { self.state.withLock { $0.result != nil } }

    /// The call has ended and the reader has taken every message: only metadata or the end are left.
    package var isFinishedAndRead: Bool {
        self.state.withLock { state in
            guard state.ended != nil else { return false }
            return state.inbox[state.inboxHead...].allSatisfy {
                switch $0 {
                case .part(.metadata), .part(.end): return true
                case .part(.message), .compressed, .packed: return false
                }
            }
        }
    }

    /// A writer is suspended on a full send buffer (for tests).
    package var hasWaitingWriter: Bool { self.state.withLock { !$0.writeWaiters.isEmpty } }
    package var hasWaitingReader: Bool { self.state.withLock { $0.readWaiter != nil } }
    /// What unread messages cost (see `State.inboxBytes`; for tests and the slow-reader bound).
    package var bufferedInboundBytes: Int { self.state.withLock { $0.inboxBytes } }
    /// Inbox entries waiting, and the bytes the packed messages hold (for tests).
    package var bufferedEntries: (entries: Int, packedBytes: Int) {
        self.state.withLock { ($0.inbox.count - $0.inboxHead, $0.packed.count - $0.packedHead) }
    }
    /// Bytes written and not yet sent.
    package var bufferedOutboundBytes: Int { self.state.withLock { $0.outboxBytes } }
}
