import CNghttp2
import GRPCCMWire

/// The request headers every call of a connection shares (`:method`, `:scheme`, `:authority`, `te`,
/// `content-type`, `user-agent`, `grpc-accept-encoding`), encoded once and shared by the loop's connections that send
/// the same ones (`RequestHeaderPrefixCache`).
///
/// Their bytes live, unmoved, as long as a connection holds them: nghttp2 is told not to copy them
/// (`NGHTTP2_NV_FLAG_NO_COPY_NAME | NO_COPY_VALUE`), which saves a copy and a lower-casing pass over some 120 bytes
/// for every call. nghttp2 reads them until the HEADERS frame is serialized, always within the life of the session,
/// which the connection owns and ends before this is freed.
/// `@unchecked Sendable`: immutable after init.
package final class RequestHeaderPrefix: @unchecked Sendable {
    /// The fields, in wire order, as nghttp2 takes them.
    let nvs: [nghttp2_nv]
    /// Bytes of names and values, for the header list size (RFC 9113 §6.5.2).
    let byteCount: Int
    private let storage: UnsafeMutableRawBufferPointer

    package init(authority: String, scheme: String, userAgent: String, acceptEncoding: String? = nil) {
        var pairs = [
            (":method", "POST"), (":scheme", scheme), (":authority", authority), ("te", "trailers"),
            ("content-type", "application/grpc"), ("user-agent", userAgent),
        ]
        if let acceptEncoding { pairs.append(("grpc-accept-encoding", acceptEncoding)) }
        let byteCount = pairs.reduce(0) { $0 + $1.0.utf8.count + $1.1.utf8.count }
        let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: max(byteCount, 1), alignment: 1)
        let base = storage.baseAddress!.assumingMemoryBound(to: UInt8.self)
        var offset = 0
        func place(_ text: String) -> (UnsafeMutablePointer<UInt8>, Int) {
            let start = base + offset
            for byte in text.utf8 {
                base[offset] = byte
                offset += 1
            }
            return (start, offset - (start - base))
        }
        let flags = UInt8(NGHTTP2_NV_FLAG_NO_COPY_NAME.rawValue | NGHTTP2_NV_FLAG_NO_COPY_VALUE.rawValue)
        self.nvs = pairs.map { name, value in
            let (namePointer, nameLength) = place(name)
            let (valuePointer, valueLength) = place(value)
            return nghttp2_nv(name: namePointer, value: valuePointer, namelen: nameLength, valuelen: valueLength, flags: flags)
        }
        self.byteCount = byteCount
        self.storage = storage
    }

    deinit {
        self.storage.deallocate()
    }
}

/// The loop's `RequestHeaderPrefix`es (`Reactor.shared`), one per distinct set of fixed fields: connections of a
/// loop to the same authority, with the same settings, share one rather than hold about half a kilobyte each (its
/// field array and bytes), which is most of what they would repeat. Held weakly, so a prefix lives as long as the
/// connections that use it; dead entries are swept when the table has doubled since the last sweep.
/// Reactor thread only (connections are made there).
final class RequestHeaderPrefixCache {
    private struct Key: Hashable {
        let authority: String
        let scheme: String
        let userAgent: String
        let acceptEncoding: String?
    }

    private struct Entry {
        weak var prefix: RequestHeaderPrefix?
    }

    private var entries: [Key: Entry] = [:]
    private var sweepAt = 8

    func prefix(authority: String, scheme: String, userAgent: String, acceptEncoding: String?) -> RequestHeaderPrefix {
        let key = Key(authority: authority, scheme: scheme, userAgent: userAgent, acceptEncoding: acceptEncoding)
        if let prefix = self.entries[key]?.prefix { return prefix }
        if self.entries.count >= self.sweepAt {
            self.entries = self.entries.filter { $0.value.prefix != nil }
            self.sweepAt = max(8, self.entries.count * 2)
        }
        let made = RequestHeaderPrefix(
            authority: authority, scheme: scheme, userAgent: userAgent, acceptEncoding: acceptEncoding)
        self.entries[key] = Entry(prefix: made)
        return made
    }

    /// Entries, dead ones included (tests).
    var count: Int { self.entries.count }
}

/// Request headers, built in one reused byte buffer so that a call costs no allocation for its header block.
/// One per reactor (`Reactor.shared`: every submission happens on its thread, and nghttp2 copies the headers during
/// `nghttp2_submit_request`), so an idle connection carries none of its buffers.
///
/// Order (PROTOCOL-HTTP2.md): pseudo-headers, `te`, `grpc-timeout`, `content-type`, `user-agent`, then metadata.
struct HeaderScratch {
    private var bytes: [UInt8] = []
    private var fields: [(name: Range<Int>, value: Range<Int>)] = []
    private var nvs: [nghttp2_nv] = []
    private var timeoutMemo = GRPCTimeout.Memo()

    init() {
        self.bytes.reserveCapacity(1024)
        self.fields.reserveCapacity(16)
    }

    /// `range` of `bytes` without spaces at either end. RFC 9113 §8.2.1 forbids them in a value (a server that checks,
    /// as nghttp2's does, resets the stream), and HTTP's semantics leave them out of it anyway (RFC 9110 §5.5).
    private static func trimmingSpaces(_ range: Range<Int>, of bytes: [UInt8]) -> Range<Int> {
        var lower = range.lowerBound
        var upper = range.upperBound
        while upper > lower && bytes[upper - 1] == 0x20 { upper -= 1 }
        while lower < upper && bytes[lower] == 0x20 { lower += 1 }
        return lower..<upper
    }

    private mutating func append(_ text: String) -> Range<Int> {
        let start = self.bytes.count
        self.bytes.append(contentsOf: text.utf8)
        return start..<self.bytes.count
    }

    /// Submits a request with `head` on `session`, its body pulled from `source`.
    /// - Parameter maxHeaderListSize: The peer's SETTINGS_MAX_HEADER_LIST_SIZE: a header list larger than that (RFC
    ///   9113 §6.5.2: name + value + 32 per field) is not sent.
    /// - Returns: The stream id, or a negative nghttp2 error; `headerListTooLarge` with the size when over the limit.
    mutating func submit(
        prefix: RequestHeaderPrefix, session: OpaquePointer, head: RequestHead, source: UnsafeMutableRawPointer,
        maxHeaderListSize: UInt32
    ) -> SubmitResult {
        let previousAttempts = head.previousRPCAttempts
        // Emptied only when used: `removeAll(keepingCapacity:)` costs some 60 instructions even on an empty array,
        // and a call without metadata leaves both empty.
        if !self.bytes.isEmpty { self.bytes.removeAll(keepingCapacity: true) }
        if !self.fields.isEmpty { self.fields.removeAll(keepingCapacity: true) }
        // This call's own fields, in the scratch buffer (nghttp2 copies these), go after the connection's fixed
        // fields. :path (right after :scheme) and grpc-timeout (right after the pseudo-headers) are not copied here:
        // nghttp2 copies :path straight from the string, and the timeout from the stack (`submitFields`).
        if head.encoding != .identity {
            self.fields.append((name: self.append("grpc-encoding"), value: self.append(head.encoding.name)))
        }
        if previousAttempts > 0 {
            // gRFC A6: how many attempts came before this one.
            self.fields.append((name: self.append("grpc-previous-rpc-attempts"), value: self.append(String(previousAttempts))))
        }
        // Read in place: a copy of the metadata (or of the path, below) was a retain and a release every call.
        if !head.metadata.isEmpty { self.appendMetadata(head.metadata) }
        return self.submitFields(
            prefix: prefix, session: session, path: head.path, timeoutNanoseconds: head.timeoutNanoseconds,
            source: source, maxHeaderListSize: maxHeaderListSize)
    }

    private mutating func appendMetadata(_ metadata: borrowing CallMetadata) {
        for entry in metadata {
            let name = self.append(entry.name)
            let start = self.bytes.count
            switch entry.value {
            case .string(let text):
                self.bytes.append(contentsOf: text.utf8)
                self.fields.append((name: name, value: Self.trimmingSpaces(start..<self.bytes.count, of: self.bytes)))
            case .binary(let data):
                Base64.encode(data, into: &self.bytes)
                self.fields.append((name: name, value: start..<self.bytes.count))
            }
        }
    }

    /// Submits the fixed fields, `:path`, `grpc-timeout` and the fields gathered in the scratch.
    private mutating func submitFields(
        prefix: RequestHeaderPrefix, session: OpaquePointer, path: borrowing String, timeoutNanoseconds: Int64?,
        source: UnsafeMutableRawPointer, maxHeaderListSize: UInt32
    ) -> SubmitResult {
        var timeoutText: (UInt64, UInt64) = (0, 0)
        let timeoutLength = timeoutNanoseconds.map { nanoseconds in
            withUnsafeMutableBytes(of: &timeoutText) { raw in
                self.timeoutMemo.encode(nanoseconds: nanoseconds, into: raw.bindMemory(to: UInt8.self))
            }
        }
        let fields = self.fields  // a retain, not a copy: the nv array is built in wire order from it
        let fixed = prefix.nvs
        // RFC 9113 §6.5.2 size of the whole list: every byte of names and values plus 32 per field.
        let fieldCount = fixed.count + fields.count + 1 + (timeoutLength == nil ? 0 : 1)
        let listSize = prefix.byteCount + Self.pathName.utf8CodeUnitCount + path.utf8.count + self.bytes.count
            + (timeoutLength.map { Self.timeoutName.utf8CodeUnitCount + $0 } ?? 0) + 32 * fieldCount
        if UInt64(listSize) > UInt64(maxHeaderListSize) { return .headerListTooLarge(listSize) }
        // The nv array is written in place, by index: it only ever grows (to the largest request so far), and nghttp2
        // is given the fields of this one.
        if self.nvs.count < fieldCount {
            self.nvs = [nghttp2_nv](repeating: nghttp2_nv(), count: max(fieldCount, 16))
        }
        let rc = withUnsafeMutableBytes(of: &timeoutText) { timeoutBytes in
            Self.withUTF8(of: path) { pathBytes in
                self.bytes.withUnsafeMutableBufferPointer { buffer -> Int32 in
                    let base = buffer.baseAddress!
                    return self.nvs.withUnsafeMutableBufferPointer { nva -> Int32 in
                        var count = 0
                        func put(_ nv: nghttp2_nv) {
                            nva[count] = nv
                            count += 1
                        }
                        func put(_ field: (name: Range<Int>, value: Range<Int>)) {
                            put(
                                nghttp2_nv(
                                    name: base + field.name.lowerBound, value: base + field.value.lowerBound,
                                    namelen: field.name.count, valuelen: field.value.count,
                                    flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue)))
                        }
                        put(fixed[0])  // :method
                        put(fixed[1])  // :scheme
                        put(
                            nghttp2_nv(
                                name: UnsafeMutablePointer(mutating: Self.pathName.utf8Start),
                                value: UnsafeMutablePointer(mutating: pathBytes.baseAddress ?? Self.pathName.utf8Start),
                                namelen: Self.pathName.utf8CodeUnitCount, valuelen: pathBytes.count,
                                flags: UInt8(NGHTTP2_NV_FLAG_NO_COPY_NAME.rawValue)))
                        put(fixed[2])  // :authority
                        put(fixed[3])  // te
                        if let timeoutLength {
                            put(
                                nghttp2_nv(
                                    name: UnsafeMutablePointer(mutating: Self.timeoutName.utf8Start),
                                    value: timeoutBytes.baseAddress!.assumingMemoryBound(to: UInt8.self),
                                    namelen: Self.timeoutName.utf8CodeUnitCount, valuelen: timeoutLength,
                                    flags: UInt8(NGHTTP2_NV_FLAG_NO_COPY_NAME.rawValue)))
                        }
                        for index in 4..<fixed.count { put(fixed[index]) }
                        for field in fields { put(field) }
                        var provider = nghttp2_data_provider(
                            source: nghttp2_data_source(ptr: source), read_callback: clientReadRequest)
                        return nghttp2_submit_request(session, nil, nva.baseAddress, count, &provider, source)
                    }
                }
            }
        }
        return rc < 0 ? .error(rc) : .submitted(rc)
    }

    /// `text`'s UTF-8 bytes, read in place (`withUTF8` is mutating: it needs a copy of the string); a string that is
    /// not stored as contiguous UTF-8 (bridged, say) is copied first.
    @inline(__always)
    private static func withUTF8<R>(of text: borrowing String, _ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
        if let result = text.utf8.withContiguousStorageIfAvailable(body) { return result }
        var copy = copy text
        return copy.withUTF8(body)
    }

    /// Static bytes: nghttp2 may keep pointing at the names (`NO_COPY_NAME`).
    private static let pathName: StaticString = ":path"
    private static let timeoutName: StaticString = "grpc-timeout"

    enum SubmitResult {
        case submitted(Int32)
        case headerListTooLarge(Int)
        case error(Int32)
    }
}

/// The reactor's one `HeaderScratch` (`Reactor.shared`), in a class so that every connection of the reactor reaches the
/// same buffers; the struct inside keeps a submission to one exclusivity check.
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
final class HeaderScratchBox {
    @exclusivity(unchecked)
    var scratch = HeaderScratch()
}
