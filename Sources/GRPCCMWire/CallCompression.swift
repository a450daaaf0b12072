/// A message compression algorithm (gRPC `doc/compression.md`): what `grpc-encoding` names and
/// `grpc-accept-encoding` lists.
public enum CallCompression: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// No compression.
    case identity
    /// gzip (RFC 1952), through zlib.
    case gzip
    /// gRPC's "deflate": the zlib format (RFC 1950), as grpc-go, grpc-java and grpc core write it.
    case deflate

    /// The name on the wire.
    public var name: String { self.rawValue }

    public var description: String { self.rawValue }

    /// The algorithm a `grpc-encoding` value names; nil for one this client does not implement.
    public init?(name: String) {
        self.init(rawValue: name)
    }
}
