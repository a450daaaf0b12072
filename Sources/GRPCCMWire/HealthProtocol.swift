/// grpc.health.v1 (grpc `doc/health-checking.md`): the two tiny messages, hand-encoded (field 1 only), so that
/// health checks need no protobuf library.
public enum HealthStatus: Int, Sendable, Hashable, CustomStringConvertible {
    /// The server did not say (grpc.health.v1's UNKNOWN).
    case unknown = 0
    /// The service takes calls.
    case serving = 1
    /// The service is up but does not take calls.
    case notServing = 2
    /// Only `Watch` sends it, for a service the server does not know.
    case serviceUnknown = 3

    public var description: String {
        switch self {
        case .unknown: return "UNKNOWN"
        case .serving: return "SERVING"
        case .notServing: return "NOT_SERVING"
        case .serviceUnknown: return "SERVICE_UNKNOWN"
        }
    }
}

package enum HealthProto {
    package static let checkPath = "/grpc.health.v1.Health/Check"
    package static let watchPath = "/grpc.health.v1.Health/Watch"

    /// HealthCheckRequest { string service = 1; }
    package static func encodeRequest(service: String) -> [UInt8] {
        ProtobufWire.lengthDelimited(1, Array(service.utf8))
    }

    /// The service name of a HealthCheckRequest ("" when absent or malformed).
    package static func decodeRequest(_ bytes: [UInt8]) -> String {
        ProtobufWire.lastLengthDelimited(1, in: bytes).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }

    /// HealthCheckResponse { ServingStatus status = 1; }
    package static func encodeResponse(_ status: HealthStatus) -> [UInt8] {
        status == .unknown ? [] : [0x08, UInt8(status.rawValue)]
    }

    /// nil when the bytes are not a HealthCheckResponse. Fields it does not know are skipped, whatever their type
    /// or number, as protobuf requires: a newer server may add some.
    package static func decodeResponse(_ bytes: [UInt8]) -> HealthStatus? {
        var status = HealthStatus.unknown
        let wellFormed = ProtobufWire.forEachField(bytes[...]) { number, field in
            // A value past Int's range is the peer's nonsense, not a trap: UNKNOWN, as any unknown value.
            if number == 1, case .varint(let value) = field {
                status = Int(exactly: value).flatMap(HealthStatus.init(rawValue:)) ?? .unknown
            }
        }
        return wellFormed ? status : nil
    }
}
