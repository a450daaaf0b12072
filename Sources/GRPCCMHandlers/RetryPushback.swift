import GRPCCMReactor
import GRPCCMWire

/// Parses `grpc-retry-pushback-ms` (gRFC A6): a non-negative decimal is a delay; a negative or malformed value
/// means "do not retry".
package enum RetryPushback: Equatable {
    case none
    case after(Duration)
    case stop

    package init(_ values: [MetadataValue]) {
        guard let first = values.first else {
            self = .none
            return
        }
        guard values.count == 1, case .string(let text) = first, let ms = Int(text), ms >= 0, ms <= Int(Int32.max),
            text.first != "+", !(text.count > 1 && text.first == "0")
        else {
            self = .stop
            return
        }
        self = .after(.milliseconds(ms))
    }
}
