#if canImport(Glibc)
import Glibc
#endif

/// Header names compared as bytes, so the common headers never become Strings.
package enum HeaderName {
    package static let status: StaticString = ":status"
    package static let path: StaticString = ":path"
    package static let grpcStatus: StaticString = "grpc-status"
    package static let grpcMessage: StaticString = "grpc-message"
    package static let contentType: StaticString = "content-type"
    package static let applicationGRPC: StaticString = "application/grpc"
    package static let grpcEncoding: StaticString = "grpc-encoding"
    package static let grpcAcceptEncoding: StaticString = "grpc-accept-encoding"
    package static let grpcTimeout: StaticString = "grpc-timeout"

    @inlinable
    @inline(__always)
    package static func equals(_ bytes: UnsafeBufferPointer<UInt8>, _ name: StaticString) -> Bool {
        guard bytes.count == name.utf8CodeUnitCount else { return false }
        return memcmp(bytes.baseAddress!, name.utf8Start, bytes.count) == 0
    }

    /// HTTP/1.1's connection-specific fields, which HTTP/2 forbids (RFC 9113 §8.2.2): never sent as metadata, and
    /// a response that carries one is malformed.
    package static let connectionSpecific: [StaticString] = [
        "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
    ]

    package static func isConnectionSpecific(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        Self.connectionSpecific.contains { Self.equals(bytes, $0) }
    }

    /// RFC 9113 §8.2.1 / RFC 9110 §5.6.2: a field name is a token, and HTTP/2 sends it in lower case. Bit `b` of
    /// `tokenBytesBelow64` is set for each byte `b` allowed below 64, bit `b - 64` of `tokenBytesFrom64` for each
    /// from 64 to 127: the bytes ``!#$%&'*+-.^_`|~``, the digits and `a` to `z`. Constants (a table computed at first
    /// use cost a lazy-initialisation check per call), tested against that list.
    package static let tokenBytesBelow64: UInt64 = 0x03FF_6CFA_0000_0000
    package static let tokenBytesFrom64: UInt64 = 0x57FF_FFFF_C000_0000

    /// A lower-case token: what a regular field's name must be (nghttp2's `nghttp2_check_header_name`).
    package static func isValidName(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        guard !bytes.isEmpty else { return false }
        for byte in bytes {
            // No byte of 128 or more is in a token.
            let word = byte < 64 ? Self.tokenBytesBelow64 : byte < 128 ? Self.tokenBytesFrom64 : 0
            if (word >> UInt64(byte & 63)) & 1 == 0 { return false }
        }
        return true
    }

    /// A `-bin` name: its values are base64 on the wire and bytes in metadata.
    package static func isBinary(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        let suffix: StaticString = "-bin"
        guard bytes.count >= 4 else { return false }
        return memcmp(bytes.baseAddress! + (bytes.count - 4), suffix.utf8Start, 4) == 0
    }

    /// RFC 9110 §5.5: no NUL, CR or LF (nor other controls but HTAB) in a value (nghttp2's
    /// `nghttp2_check_header_value`, Go's `httpguts.ValidHeaderFieldValue`). A space or HTAB at either end, which
    /// RFC 9113 §8.2.1 also forbids, is let through, as grpc-go's client lets it: gRPC leaves spaces in
    /// `grpc-message` unencoded, and a message that ends with one ("invalid name: ") is a server's ordinary answer.
    package static func isValidValue(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        for byte in bytes where (byte < 0x20 && byte != 0x09) || byte == 0x7F {
            return false
        }
        return true
    }

    /// A non-negative decimal of at most 10 digits without a sign; nil for anything else.
    @inlinable
    package static func parseInt(_ bytes: UnsafeBufferPointer<UInt8>) -> Int? {
        guard !bytes.isEmpty, bytes.count <= 10 else { return nil }
        // Ten digits cannot overflow an Int, so the arithmetic goes unchecked.
        var value = 0
        for byte in bytes {
            let digit = byte &- UInt8(ascii: "0")
            guard digit < 10 else { return nil }
            value = value &* 10 &+ Int(digit)
        }
        return value
    }
}
