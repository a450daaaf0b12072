/// The few protobuf wire-format rules the health messages and the echo server's `echo.Echo` need, so that neither
/// pulls in a protobuf library.
package enum ProtobufWire {
    /// Field `number` as a length-delimited value (a string or bytes field); empty for an empty value (proto3
    /// leaves default values out).
    package static func lengthDelimited(_ number: Int, _ value: [UInt8]) -> [UInt8] {
        guard !value.isEmpty else { return [] }
        var out: [UInt8] = []
        out.reserveCapacity(value.count + 6)
        Self.appendVarint(UInt64(number << 3 | 2), to: &out)
        Self.appendVarint(UInt64(value.count), to: &out)
        out.append(contentsOf: value)
        return out
    }

    /// Field `number` as a varint (an integer or bool field); empty for 0 (proto3 leaves default values out).
    package static func varintField(_ number: Int, _ value: UInt64) -> [UInt8] {
        guard value != 0 else { return [] }
        var out: [UInt8] = []
        Self.appendVarint(UInt64(number << 3), to: &out)
        Self.appendVarint(value, to: &out)
        return out
    }

    /// One field of a message, as `forEachField` hands it over.
    package enum Field {
        case varint(UInt64)
        case bytes(ArraySlice<UInt8>)
        case fixed
    }

    /// Calls `body` with each field's number and value, in order. Returns false when the bytes are malformed.
    @discardableResult
    package static func forEachField(_ bytes: ArraySlice<UInt8>, _ body: (Int, Field) -> Void) -> Bool {
        let bytes = Array(bytes)
        var index = 0
        while index < bytes.count {
            guard let (key, afterKey) = Self.varint(bytes, from: index) else { return false }
            index = afterKey
            let number = Int(key >> 3)
            switch key & 7 {
            case 0:
                guard let (value, next) = Self.varint(bytes, from: index) else { return false }
                index = next
                body(number, .varint(value))
            case 1:
                index += 8
                body(number, .fixed)
            case 2:
                guard let range = Self.lengthDelimitedRange(bytes, from: index) else { return false }
                index = range.upperBound
                body(number, .bytes(bytes[range]))
            case 5:
                index += 4
                body(number, .fixed)
            default:
                return false
            }
        }
        return index == bytes.count
    }

    package static func appendVarint(_ value: UInt64, to out: inout [UInt8]) {
        var value = value
        while value >= 0x80 {
            out.append(UInt8(value & 0x7F) | 0x80)
            value >>= 7
        }
        out.append(UInt8(value))
    }

    /// A varint at `start`: its value and the index after it; nil when truncated.
    package static func varint(_ bytes: [UInt8], from start: Int) -> (UInt64, Int)? {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        var index = start
        while index < bytes.count && shift < 64 {
            let byte = bytes[index]
            index += 1
            value |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return (value, index) }
            shift += 7
        }
        return nil
    }

    /// The bytes of a length-delimited value whose length varint is at `start`; nil when truncated. The length is
    /// the peer's: it is checked against what is there before it becomes an `Int` (2^63 and more would trap).
    private static func lengthDelimitedRange(_ bytes: [UInt8], from start: Int) -> Range<Int>? {
        guard let (length, valueStart) = Self.varint(bytes, from: start), length <= UInt64(bytes.count - valueStart)
        else { return nil }
        return valueStart..<valueStart + Int(length)
    }

    /// The last value of length-delimited field `number` (protobuf's rule for a repeated singular field); other
    /// fields are skipped. nil when absent or when the bytes are malformed.
    package static func lastLengthDelimited(_ number: Int, in bytes: [UInt8]) -> ArraySlice<UInt8>? {
        var index = 0
        var found: ArraySlice<UInt8>?
        while index < bytes.count {
            guard let (key, afterKey) = Self.varint(bytes, from: index) else { return nil }
            index = afterKey
            switch key & 7 {
            case 0:
                guard let (_, next) = Self.varint(bytes, from: index) else { return nil }
                index = next
            case 1: index += 8
            case 2:
                guard let range = Self.lengthDelimitedRange(bytes, from: index) else { return nil }
                index = range.upperBound
                if Int(key >> 3) == number { found = bytes[range] }
            case 5: index += 4
            default: return nil
            }
        }
        return index == bytes.count ? found : nil
    }
}
