/// The `grpc-timeout` header (PROTOCOL-HTTP2.md): at most 8 digits and a unit (H, M, S, m, u, n).
///
/// Encoding rounds the timeout up to three significant digits, then writes it in the coarsest unit that holds it
/// exactly: 29.9997 s left of a 30 s deadline is sent as `30S`. Two reasons:
/// - The server never sees a deadline earlier than the client's, and at most 1 % later. The client enforces its own
///   deadline locally, so the call still ends on time; the server may only work up to 1 % longer on a call that is
///   already failed.
/// - Calls made with the same timeout send the same text, so HPACK indexes the field once per connection. Sent to the
///   microsecond, every call's value was new: nghttp2 Huffman-coded it and added it to the dynamic table, where the
///   stream of new values pushed out the fields every call shares (grpc's C core rounds for the same reason).
/// Zero or less becomes `0n`.
package enum GRPCTimeout {
    private static let maxValue: UInt64 = 99_999_999
    /// Nanoseconds per unit, coarsest first.
    private static let units: [(size: UInt64, letter: UInt8)] = [
        (3_600_000_000_000, UInt8(ascii: "H")), (60_000_000_000, UInt8(ascii: "M")), (1_000_000_000, UInt8(ascii: "S")),
        (1_000_000, UInt8(ascii: "m")), (1_000, UInt8(ascii: "u")), (1, UInt8(ascii: "n")),
    ]

    package static func encode(nanoseconds: Int64) -> String {
        var text: (UInt64, UInt64) = (0, 0)
        return withUnsafeMutableBytes(of: &text) { raw in
            let bytes = raw.bindMemory(to: UInt8.self)
            return String(decoding: bytes[..<Self.encode(nanoseconds: nanoseconds, into: bytes)], as: UTF8.self)
        }
    }

    /// At most this many bytes: 8 digits and a unit.
    package static let maxEncodedLength = 9

    /// Writes the encoding of `nanoseconds` at the start of `buffer` (at least `maxEncodedLength` bytes), without
    /// building a string or touching the heap. Returns its length.
    package static func encode(nanoseconds: Int64, into buffer: UnsafeMutableBufferPointer<UInt8>) -> Int {
        precondition(buffer.count >= Self.maxEncodedLength)
        guard nanoseconds > 0 else {
            buffer[0] = UInt8(ascii: "0")
            buffer[1] = UInt8(ascii: "n")
            return 2
        }
        return Self.encode(rounded: Self.roundedUp(UInt64(nanoseconds)).value, into: buffer)
    }

    /// Writes `rounded` (three significant digits at most) in the coarsest unit that holds it.
    private static func encode(rounded: UInt64, into buffer: UnsafeMutableBufferPointer<UInt8>) -> Int {
        // The coarsest unit that holds the rounded value exactly; failing that (only beyond 8 digits of hours or
        // minutes), the finest unit whose value fits, rounded up once more.
        var chosen: (value: UInt64, letter: UInt8)? = nil
        for unit in Self.units where rounded % unit.size == 0 && rounded / unit.size <= Self.maxValue {
            chosen = (rounded / unit.size, unit.letter)
            break
        }
        if chosen == nil {
            for unit in Self.units.reversed() {
                let value = rounded / unit.size + (rounded % unit.size == 0 ? 0 : 1)
                if value <= Self.maxValue {
                    chosen = (value, unit.letter)
                    break
                }
            }
        }
        let (value, letter) = chosen ?? (Self.maxValue, UInt8(ascii: "H"))
        var divisor: UInt64 = 1
        while value / divisor >= 10 { divisor *= 10 }
        var rest = value
        var length = 0
        while divisor > 0 {
            buffer[length] = UInt8(ascii: "0") + UInt8(rest / divisor)
            length += 1
            rest %= divisor
            divisor /= 10
        }
        buffer[length] = letter
        return length + 1
    }

    /// `value` rounded up to three significant digits, and the power of ten it was rounded to: the largest that
    /// leaves `value` at least 100 of it (1 below 1,000).
    private static func roundedUp(_ value: UInt64) -> (value: UInt64, scale: UInt64) {
        var scale: UInt64 = 1
        while value / scale >= 1_000 { scale *= 10 }
        let (quotient, remainder) = value.quotientAndRemainder(dividingBy: scale)
        return ((quotient + (remainder == 0 ? 0 : 1)) * scale, scale)
    }

    /// The last encoding, kept with the timeouts that share it: a loop's calls with the same timeout mostly send the
    /// same text (`30S` for anything from 29.9 s to 30 s), and a hit costs two comparisons and a copy instead of the
    /// rounding, the unit search and the digits (about 230 instructions).
    package struct Memo {
        /// Every timeout in `lowest...highest` encodes as `text` (some just outside do too, and are encoded again);
        /// none is kept while `lowest > highest`.
        private var lowest: UInt64 = 1
        private var highest: UInt64 = 0
        private var text: (UInt64, UInt64) = (0, 0)
        private var length = 0

        package init() {}

        /// `GRPCTimeout.encode(nanoseconds:into:)`, the same bytes.
        package mutating func encode(nanoseconds: Int64, into buffer: UnsafeMutableBufferPointer<UInt8>) -> Int {
            precondition(buffer.count >= GRPCTimeout.maxEncodedLength)
            guard nanoseconds > 0 else { return GRPCTimeout.encode(nanoseconds: nanoseconds, into: buffer) }
            let timeout = UInt64(nanoseconds)
            if timeout < self.lowest || timeout > self.highest {
                let (rounded, scale) = GRPCTimeout.roundedUp(timeout)
                self.length = withUnsafeMutableBytes(of: &self.text) { raw in
                    GRPCTimeout.encode(rounded: rounded, into: raw.bindMemory(to: UInt8.self))
                }
                // What rounds up to `rounded` at the same scale: above the step below it, and not below 100 steps
                // (a smaller value is rounded at a finer scale, where it may or may not come to the same text).
                self.lowest = scale == 1 ? rounded : max(rounded - scale + 1, 100 * scale)
                self.highest = rounded
            }
            withUnsafeBytes(of: self.text) { raw in
                UnsafeMutableRawBufferPointer(buffer).copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[..<self.length]))
            }
            return self.length
        }
    }

    /// Returns nil for anything but 1...8 digits and a known unit.
    package static func decode(_ text: String) -> Int64? {
        let bytes = Array(text.utf8)
        guard bytes.count >= 2, bytes.count <= 9 else { return nil }
        var value: Int64 = 0
        for byte in bytes.dropLast() {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            value = value * 10 + Int64(byte - UInt8(ascii: "0"))
        }
        let multiplier: Int64
        switch bytes.last! {
        case UInt8(ascii: "H"): multiplier = 3_600_000_000_000
        case UInt8(ascii: "M"): multiplier = 60_000_000_000
        case UInt8(ascii: "S"): multiplier = 1_000_000_000
        case UInt8(ascii: "m"): multiplier = 1_000_000
        case UInt8(ascii: "u"): multiplier = 1_000
        case UInt8(ascii: "n"): multiplier = 1
        default: return nil
        }
        let (result, overflow) = value.multipliedReportingOverflow(by: multiplier)
        return overflow ? Int64.max : result
    }
}
