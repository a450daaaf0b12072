#if canImport(Glibc)
import Glibc
#endif

/// The metadata names a channel's responses carried before, kept as the strings their metadata holds.
///
/// A server tends to send the same custom fields on every response (a request id, a server version, an echo of the
/// deadline). Each such name was checked byte by byte, made into a String (an allocation when it is longer than
/// 15 bytes) and freed again with the response: some 700 instructions per field and call. A name found here is
/// none of that, only compared. Found means spelled exactly so before and accepted then as a valid,
/// not connection-specific name, so no check is skipped that could fail.
///
/// Bounded: the first `capacity` distinct names of at most `longestName` bytes stay, later or longer ones are not kept
/// (a server that invents names costs the checks it always did, and at most a kilobyte here). One per call
/// environment (a channel's part on one loop, a health watch), used on that loop's thread only.
package final class MetadataNameCache {
    package static let capacity = 16
    package static let longestName = 64

    /// Every kept name's bytes, one after the other; `spans` says where each begins and how long it is. Plain
    /// values, so a lookup walks them without a retain. Unchecked exclusivity: one thread, and no access overlaps
    /// another (each checked access cost a runtime call).
    @exclusivity(unchecked)
    private var bytes: [UInt8] = []
    @exclusivity(unchecked)
    private var spans: [(start: Int, count: Int)] = []
    @exclusivity(unchecked)
    private var names: [String] = []

    package init() {}

    package var count: Int { self.names.count }

    /// The name spelled `spelling`, if it is kept.
    package func name(spelled spelling: UnsafeBufferPointer<UInt8>) -> String? {
        guard let wanted = spelling.baseAddress else { return nil }
        let count = spelling.count
        let found = self.spans.withUnsafeBufferPointer { spans -> Int? in
            self.bytes.withUnsafeBufferPointer { kept -> Int? in
                for index in spans.indices
                where spans[index].count == count && memcmp(kept.baseAddress! + spans[index].start, wanted, count) == 0 {
                    return index
                }
                return nil
            }
        }
        guard let found else { return nil }
        return self.names[found]
    }

    /// Keeps `name`, spelled `spelling`, unless the cache is full. The caller has checked the name.
    package func keep(_ name: String, spelled spelling: UnsafeBufferPointer<UInt8>) {
        guard self.names.count < Self.capacity, !spelling.isEmpty, spelling.count <= Self.longestName else { return }
        self.spans.append((start: self.bytes.count, count: spelling.count))
        self.bytes.append(contentsOf: spelling)
        self.names.append(name)
    }
}
