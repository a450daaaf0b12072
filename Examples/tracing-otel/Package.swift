// swift-tools-version:6.2
import PackageDescription

// A package of its own: swift-otel's build (SwiftNIO, grpc-swift-2, protobuf) takes minutes on two cores, and the
// connection manager's own build must not pay for it. `swift run` here builds it; CI does not.
let package = Package(
    name: "tracing-otel-example",
    dependencies: [
        .package(name: "grpc-connection-manager", path: "../.."),
        .package(url: "https://github.com/swift-otel/swift-otel.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
    ],
    targets: [
        .executableTarget(
            name: "TracingOTelExample",
            dependencies: [
                .product(name: "GRPCConnectionManager", package: "grpc-connection-manager"),
                .product(name: "GRPCConnectionManagerTracing", package: "grpc-connection-manager"),
                .product(name: "GRPCEchoServer", package: "grpc-connection-manager"),
                .product(name: "OTel", package: "swift-otel"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        )
    ]
)
