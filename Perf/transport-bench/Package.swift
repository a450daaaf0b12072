// swift-tools-version:6.1
import Foundation
import PackageDescription

// The root package is a path dependency, whose identity is its folder's name (a clone may be called anything).
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
let rootIdentity = root.lastPathComponent.lowercased()

// transport-bench: the same generated grpc-swift-2 client over ManagedClientTransport and over
// grpc-swift-nio-transport. A package of its own so that SwiftNIO never enters the product's build.
// `make bench-transport` builds it in release and runs Perf/transport_bench.py.
let package = Package(
    name: "transport-bench",
    dependencies: [
        .package(path: root.path),
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
    ],
    targets: [
        .executableTarget(
            name: "transport-bench",
            dependencies: [
                .product(name: "GRPCConnectionManager", package: rootIdentity),
                .product(name: "GRPCConnectionManagerTransport", package: rootIdentity),
                .product(name: "GRPCEchoServer", package: rootIdentity),
                .product(name: "EchoProto", package: rootIdentity),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2Posix", package: "grpc-swift-nio-transport"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        )
    ]
)
