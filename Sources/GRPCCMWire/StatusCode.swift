/// A gRPC status code.
///
/// A struct over the raw value rather than an enum, so that codes a future peer sends (and codes we add) never
/// break a caller's `switch`.
public struct StatusCode: Hashable, Sendable, CustomStringConvertible {
    /// The wire value (0...16 for the codes gRPC defines).
    public let rawValue: Int

    /// Any value: values outside 0...16 are kept (and named "Code(n)") rather than rejected.
    public init(rawValue: Int) { self.rawValue = rawValue }

    /// Not an error.
    public static let ok = StatusCode(rawValue: 0)
    /// Cancelled, typically by the caller.
    public static let cancelled = StatusCode(rawValue: 1)
    /// An unknown error (also: a status this client could not read).
    public static let unknown = StatusCode(rawValue: 2)
    /// The caller gave an invalid argument.
    public static let invalidArgument = StatusCode(rawValue: 3)
    /// The deadline passed before the call ended.
    public static let deadlineExceeded = StatusCode(rawValue: 4)
    /// Something requested was not found.
    public static let notFound = StatusCode(rawValue: 5)
    /// What the caller tried to create already exists.
    public static let alreadyExists = StatusCode(rawValue: 6)
    /// The caller may not do this.
    public static let permissionDenied = StatusCode(rawValue: 7)
    /// A resource ran out (a quota, a size limit).
    public static let resourceExhausted = StatusCode(rawValue: 8)
    /// The system is not in a state this operation needs.
    public static let failedPrecondition = StatusCode(rawValue: 9)
    /// Aborted, typically by a concurrency conflict.
    public static let aborted = StatusCode(rawValue: 10)
    /// Past the valid range.
    public static let outOfRange = StatusCode(rawValue: 11)
    /// The method is not implemented or supported.
    public static let unimplemented = StatusCode(rawValue: 12)
    /// An internal error: an invariant broken.
    public static let `internal` = StatusCode(rawValue: 13)
    /// The service is unavailable now; retrying may help.
    public static let unavailable = StatusCode(rawValue: 14)
    /// Unrecoverable data loss or corruption.
    public static let dataLoss = StatusCode(rawValue: 15)
    /// The caller has no valid credentials.
    public static let unauthenticated = StatusCode(rawValue: 16)

    private static let names = [
        "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
        "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
        "Internal", "Unavailable", "DataLoss", "Unauthenticated",
    ]

    private static let protoNames = [
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
        "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    ]

    /// grpcurl's spelling ("DeadlineExceeded", "Canceled"), used by the CLI.
    public var name: String {
        (0..<Self.names.count).contains(self.rawValue) ? Self.names[self.rawValue] : "Code(\(self.rawValue))"
    }

    /// The proto enum spelling ("DEADLINE_EXCEEDED"), used in logs and metric labels like grpc-go.
    public var protoName: String {
        (0..<Self.protoNames.count).contains(self.rawValue) ? Self.protoNames[self.rawValue] : "CODE_\(self.rawValue)"
    }

    public var description: String { self.protoName }

    /// Parses a proto name (any case) or a decimal number.
    public init?(name: String) {
        if let value = Int(name) {
            self.init(rawValue: value)
            return
        }
        let upper = name.uppercased()
        if let index = Self.protoNames.firstIndex(of: upper) {
            self.init(rawValue: index)
        } else if let index = Self.names.firstIndex(where: { $0.uppercased() == upper }) {
            self.init(rawValue: index)
        } else {
            return nil
        }
    }
}
