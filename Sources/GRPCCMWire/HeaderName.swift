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

    /// A non-negative decimal of at most 10 digits without a sign; nil for anything else.
    @inlinable
    package static func parseInt(_ bytes: UnsafeBufferPointer<UInt8>) -> Int? {
        guard !bytes.isEmpty, bytes.count <= 10 else { return nil }
        var value = 0
        for byte in bytes {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            value = value * 10 + Int(byte - UInt8(ascii: "0"))
        }
        return value
    }
}
