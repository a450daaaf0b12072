#if canImport(Glibc)
import Glibc
#endif

/// A growable run of bytes on the way to the socket, kept by hand.
///
/// nghttp2's output is appended two or three times per call, and `[UInt8].append(contentsOf:)` of a raw buffer
/// cost about 80 instructions beyond the copy itself (its generic path: the count estimate, the capacity and
/// uniqueness checks, the copy's return of an iterator). Here an append is a capacity check and a `memcpy`.
///
/// Noncopyable: one owner (`SocketOutput`), and the storage goes with it. Reactor thread only.
package struct OutputBytes: ~Copyable {
    private var base: UnsafeMutableRawPointer? = nil
    package private(set) var count = 0
    package private(set) var capacity = 0

    package init() {}

    deinit { free(self.base) }

    package var isEmpty: Bool { self.count == 0 }

    /// Appends a copy of `bytes`.
    package mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard let source = bytes.baseAddress, bytes.count > 0 else { return }
        self.reserve(bytes.count).copyMemory(from: source, byteCount: bytes.count)
        self.count += bytes.count
    }

    /// Appends what `fill` writes into `maximum` fresh bytes: it returns how many it wrote (a negative count or 0:
    /// nothing; more than `maximum` counts as `maximum`). Returns the count appended, or `fill`'s negative one.
    package mutating func append(upTo maximum: Int, _ fill: (UnsafeMutableRawBufferPointer) -> Int) -> Int {
        guard maximum > 0 else { return 0 }
        let space = self.reserve(maximum)
        let written = fill(UnsafeMutableRawBufferPointer(start: space, count: maximum))
        guard written > 0 else { return written }
        let appended = min(written, maximum)
        self.count += appended
        return appended
    }

    /// Drops the last `n` bytes.
    package mutating func removeLast(_ n: Int) {
        precondition(n >= 0 && n <= self.count, "removeLast(\(n)) of \(self.count) bytes")
        self.count -= n
    }

    /// Drops the first `n` bytes (the rest moves to the front).
    package mutating func removeFirst(_ n: Int) {
        precondition(n >= 0 && n <= self.count, "removeFirst(\(n)) of \(self.count) bytes")
        guard n > 0, let base = self.base else { return }
        memmove(base, base + n, self.count - n)
        self.count -= n
    }

    /// Empties the run; its storage goes too unless `keepingCapacity`.
    package mutating func removeAll(keepingCapacity: Bool) {
        self.count = 0
        if !keepingCapacity {
            free(self.base)
            self.base = nil
            self.capacity = 0
        }
    }

    /// The bytes held, from `offset` on.
    package func withUnsafeBytes<R>(from offset: Int = 0, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        precondition(offset >= 0 && offset <= self.count, "offset \(offset) of \(self.count) bytes")
        guard let base = self.base else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
        return try body(UnsafeRawBufferPointer(start: base + offset, count: self.count - offset))
    }

    /// Where `extra` more bytes go, growing the storage (at least doubling it) when they do not fit. No minimum: an
    /// idle connection's few bytes of SETTINGS and PING stay small (a 512-byte floor measured about 0.2 KiB more
    /// resident per idle connection).
    private mutating func reserve(_ extra: Int) -> UnsafeMutableRawPointer {
        let needed = self.count + extra
        if needed > self.capacity {
            let capacity = max(needed, self.capacity * 2)
            guard let grown = realloc(self.base, capacity) else { fatalError("out of memory for \(capacity) output bytes") }
            self.base = grown
            self.capacity = capacity
        }
        return self.base! + self.count
    }
}
