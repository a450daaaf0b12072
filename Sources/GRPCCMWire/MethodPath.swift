/// A call's method path, as the channel checks it before anything is sent (and the metrics before taking it as a
/// label).
package enum MethodPath {
    /// `/` then printable ASCII without spaces. Scans the string's bytes in place (the generic `contains(where:)`
    /// over `utf8` showed in callgrind at ~500 instructions a call).
    package static func isValid(_ path: String) -> Bool {
        if let valid = path.utf8.withContiguousStorageIfAvailable(Self.isValid) { return valid }
        var path = path  // not contiguous UTF-8 (a bridged string): made so
        return path.withUTF8(Self.isValid)
    }

    private static func isValid(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        guard bytes.first == UInt8(ascii: "/") else { return false }
        // Every byte visible ASCII (0x21...0x7E), eight at a time (it runs for every call): a byte below 0x21
        // borrows into its high bit when 0x21 is taken from it, a byte above 0x7E carries into it (or has it)
        // when 1 is added. A borrow or carry crossing into the next byte only ever follows a byte that fails.
        let raw = UnsafeRawBufferPointer(bytes)
        let count = raw.count
        guard count >= 8 else {
            for byte in raw where byte <= 0x20 || byte > 0x7E { return false }
            return true
        }
        func visible(at offset: Int) -> Bool {
            let ones: UInt64 = 0x0101_0101_0101_0101
            let highBits: UInt64 = 0x8080_8080_8080_8080
            let word = raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self)
            let below = (word &- ones &* 0x21) & ~word & highBits
            let above = ((word &+ ones) | word) & highBits
            return below | above == 0
        }
        var index = 0
        while index + 8 <= count {
            if !visible(at: index) { return false }
            index += 8
        }
        // The last few bytes as one more word that overlaps the one before: no byte-by-byte tail.
        return index == count || visible(at: count - 8)
    }
}
