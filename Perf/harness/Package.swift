// swift-tools-version:6.1
import Foundation
import PackageDescription

// The root package is a path dependency, whose identity is its folder's name (a clone may be called anything).
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
let rootIdentity = root.lastPathComponent.lowercased()

// grpc-cm-perf: the benchmark client. A package of its own so that its dependencies (hdrhistogram-swift) stay out
// of the product. Build in release: `swift build -c release` here (or `make bench` at the top).
let package = Package(
    name: "grpc-cm-perf",
    dependencies: [
        .package(path: root.path),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
    ],
    targets: [
        .executableTarget(
            name: "grpc-cm-perf",
            dependencies: [
                .product(name: "GRPCConnectionManager", package: rootIdentity),
                .product(name: "GRPCEchoServer", package: rootIdentity),
                .product(name: "CMallocCounter", package: rootIdentity),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        )
    ]
)
