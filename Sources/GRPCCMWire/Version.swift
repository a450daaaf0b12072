/// Library version, sent in the user-agent.
public enum GRPCConnectionManagerVersion {
    /// This package's version, as `grpc-cm --version` prints it.
    public static let string = "0.1.0"
    package static let userAgent = "grpc-swift-cm/\(GRPCConnectionManagerVersion.string)"
}
