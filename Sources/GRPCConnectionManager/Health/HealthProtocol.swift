/// grpc.health.v1 (grpc `doc/health-checking.md`): the two tiny messages, hand-encoded (field 1 only), so that
/// health checks need no protobuf library.
public enum HealthStatus: Int, Sendable, Hashable, CustomStringConvertible {
    case unknown = 0
    case serving = 1
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
        let bytes = Array(service.utf8)
        guard !bytes.isEmpty else { return [] }
        var out: [UInt8] = [0x0A]
        var length = bytes.count
        while length >= 0x80 {
            out.append(UInt8(length & 0x7F) | 0x80)
            length >>= 7
        }
        out.append(UInt8(length))
        return out + bytes
    }

    /// The service name of a HealthCheckRequest ("" when absent or malformed).
    package static func decodeRequest(_ bytes: [UInt8]) -> String {
        guard let (field, value) = Self.firstLengthDelimited(bytes), field == 1 else { return "" }
        return String(decoding: value, as: UTF8.self)
    }

    /// HealthCheckResponse { ServingStatus status = 1; }
    package static func encodeResponse(_ status: HealthStatus) -> [UInt8] {
        status == .unknown ? [] : [0x08, UInt8(status.rawValue)]
    }

    /// nil when the bytes are not a HealthCheckResponse.
    package static func decodeResponse(_ bytes: [UInt8]) -> HealthStatus? {
        var index = 0
        var status = HealthStatus.unknown
        while index < bytes.count {
            let key = bytes[index]
            index += 1
            guard key & 0x07 == 0, let (value, next) = Self.varint(bytes, from: index) else { return nil }
            index = next
            if key >> 3 == 1 { status = HealthStatus(rawValue: Int(value)) ?? .unknown }
        }
        return status
    }

    private static func varint(_ bytes: [UInt8], from start: Int) -> (UInt64, Int)? {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        var index = start
        while index < bytes.count && shift < 64 {
            let byte = bytes[index]
            index += 1
            value |= UInt64(byte & 0x7F) << shift
            if byte & 0x80 == 0 { return (value, index) }
            shift += 7
        }
        return nil
    }

    private static func firstLengthDelimited(_ bytes: [UInt8]) -> (Int, ArraySlice<UInt8>)? {
        guard let key = bytes.first, key & 0x07 == 2, let (length, start) = Self.varint(bytes, from: 1),
            start + Int(length) <= bytes.count
        else { return nil }
        return (Int(key >> 3), bytes[start..<(start + Int(length))])
    }
}
