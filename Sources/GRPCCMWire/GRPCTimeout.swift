/// The `grpc-timeout` header (PROTOCOL-HTTP2.md): at most 8 digits and a unit (H, M, S, m, u, n).
///
/// Encoding picks the finest unit whose value fits in 8 digits and rounds up, as grpc-go does, so that the server
/// never sees a deadline earlier than the client's. Zero or less becomes `0n`.
package enum GRPCTimeout {
    private static let maxValue: UInt64 = 99_999_999

    package static func encode(nanoseconds: Int64) -> String {
        guard nanoseconds > 0 else { return "0n" }
        let ns = UInt64(nanoseconds)
        if ns <= Self.maxValue { return "\(ns)n" }
        let units: [(UInt64, Character)] = [
            (1_000, "u"), (1_000_000, "m"), (1_000_000_000, "S"), (60_000_000_000, "M"), (3_600_000_000_000, "H"),
        ]
        for (size, unit) in units {
            let value = (ns + size - 1) / size
            if value <= Self.maxValue { return "\(value)\(unit)" }
        }
        return "\(Self.maxValue)H"
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
