// swift-tools-version:6.1
import PackageDescription

// The core library depends only on swift-log (and, with the handlers, swift-metrics) so that it builds quickly on
// two cores. ArgumentParser stays in the CLI; benchmark-only dependencies live in Perf/, a package of its own.
let strictSwift: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "grpc-connection-manager",
    products: [
        .library(name: "GRPCConnectionManager", targets: ["GRPCConnectionManager"]),
        .library(name: "GRPCConnectionManagerPrometheus", targets: ["GRPCConnectionManagerPrometheus"]),
        // The manager as a swift-service-lifecycle Service, for a ServiceGroup. Its own product: the core does not
        // depend on ServiceLifecycle.
        .library(name: "GRPCConnectionManagerServiceLifecycle", targets: ["GRPCConnectionManagerServiceLifecycle"]),
        // A client span per call through swift-distributed-tracing (an interceptor). Its own product: the core does
        // not depend on Tracing.
        .library(name: "GRPCConnectionManagerTracing", targets: ["GRPCConnectionManagerTracing"]),
        .library(name: "GRPCEchoServer", targets: ["GRPCEchoServer"]),
        // grpc-swift-2 generated clients over this package's connections. A product of its own, so that users who
        // don't use GRPCCore never build it.
        .library(name: "GRPCConnectionManagerTransport", targets: ["GRPCConnectionManagerTransport"]),
        // The example's generated echo.Echo client, for Perf/transport-bench.
        .library(name: "EchoProto", targets: ["EchoProto"]),
        .executable(name: "grpc-cm", targets: ["grpc-cm"]),
        // For Perf/harness only: counts heap allocations by interposing malloc in the program that links it.
        .library(name: "CMallocCounter", targets: ["CMallocCounter"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        // `make docs`: the DocC catalog (Sources/GRPCConnectionManager/GRPCConnectionManager.docc). A plugin only: it
        // builds nothing unless asked.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
        // Tests only: the coexistence test compiles against NIOCore's names (the product never uses SwiftNIO).
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        // Only for GRPCConnectionManagerTransport, its example and tests.
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        // Only for GRPCConnectionManagerTracing (client spans through the user's tracer).
        .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
    ],
    targets: [
        .systemLibrary(name: "CNghttp2", pkgConfig: "libnghttp2", providers: [.apt(["libnghttp2-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CCAres", pkgConfig: "libcares", providers: [.apt(["libc-ares-dev"])]),
        .target(name: "CReactor", cSettings: [.define("_GNU_SOURCE")]),
        // nghttp2's allocator for our sessions: large blocks on pages of their own, given back while idle.
        .target(name: "CHTTP2Memory", dependencies: ["CNghttp2"], cSettings: [.define("_GNU_SOURCE")]),
        // SIGINT/SIGTERM for the programs (CLI, examples): a library never installs signal handlers.
        .target(name: "CStopSignals"),
        // The layers, bottom to top; each may import only those below it (Sources/GRPCConnectionManager/Exports.swift
        // draws the stack). The compiler holds the arrows pointing down: a target cannot import one it does not
        // depend on.
        .target(name: "GRPCCMReactor", dependencies: ["CReactor"], swiftSettings: strictSwift),
        .target(name: "GRPCCMWire", swiftSettings: strictSwift),
        .target(
            name: "GRPCCMTransport",
            dependencies: ["GRPCCMReactor", "GRPCCMWire", "CReactor", "CNghttp2", "CHTTP2Memory", "COpenSSL"],
            swiftSettings: strictSwift
        ),
        // gzip and deflate for messages (zlib), beside the wire format: the calls compress and inflate with it.
        .target(
            name: "GRPCCMCompression", dependencies: ["GRPCCMReactor", "GRPCCMWire", "CZlib"], swiftSettings: strictSwift),
        .target(
            name: "GRPCCMCalls",
            dependencies: ["GRPCCMTransport", "GRPCCMCompression", "GRPCCMReactor", "GRPCCMWire", "CNghttp2"],
            swiftSettings: strictSwift
        ),
        .target(
            name: "GRPCCMPool",
            dependencies: ["GRPCCMCalls", "GRPCCMTransport", "GRPCCMReactor", "GRPCCMWire", "CReactor"],
            swiftSettings: strictSwift
        ),
        // Resolvers beside getaddrinfo for the pool's seam: DNS with c-ares on the loop.
        .target(
            name: "GRPCCMDiscovery",
            dependencies: ["GRPCCMPool", "GRPCCMReactor", "GRPCCMWire", "CReactor", "CCAres"],
            swiftSettings: strictSwift
        ),
        .target(
            name: "GRPCCMHandlers",
            dependencies: [
                "GRPCCMCalls", "GRPCCMReactor", "GRPCCMWire",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: strictSwift
        ),
        .target(
            name: "GRPCConnectionManager",
            dependencies: [
                "GRPCCMHandlers", "GRPCCMDiscovery", "GRPCCMPool", "GRPCCMCalls", "GRPCCMCompression", "GRPCCMTransport",
                "GRPCCMReactor",
                "GRPCCMWire", .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: strictSwift
        ),
        // Prometheus exposition with swift-prometheus, kept out of the core library so that it builds lean.
        .target(
            name: "GRPCConnectionManagerServiceLifecycle",
            dependencies: [
                "GRPCConnectionManager",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strictSwift
        ),
        .target(
            name: "GRPCConnectionManagerTracing",
            dependencies: [
                "GRPCConnectionManager", "GRPCCMWire", .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSwift
        ),
        .target(
            name: "GRPCConnectionManagerPrometheus",
            dependencies: [
                "GRPCConnectionManager",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: strictSwift
        ),
        .target(
            name: "GRPCConnectionManagerTransport",
            dependencies: ["GRPCConnectionManager", .product(name: "GRPCCore", package: "grpc-swift-2")],
            swiftSettings: strictSwift
        ),
        .target(
            name: "GRPCEchoServer",
            dependencies: ["GRPCCMReactor", "GRPCCMTransport", "GRPCCMWire", "GRPCCMCompression", "CReactor", "CNghttp2"],
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "grpc-cm",
            dependencies: [
                "GRPCConnectionManager", "GRPCEchoServer", "CStopSignals", "GRPCConnectionManagerPrometheus",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "unary-call",
            dependencies: ["GRPCConnectionManager"],
            path: "Examples/unary-call",
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "tls-example",
            dependencies: ["GRPCConnectionManager", "GRPCConnectionManagerPrometheus"],
            path: "Examples/tls",
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "embedding-example",
            dependencies: ["GRPCConnectionManager", "GRPCConnectionManagerPrometheus", "GRPCEchoServer", "CStopSignals"],
            path: "Examples/embedding",
            swiftSettings: strictSwift
        ),
        .executableTarget(
            name: "foreign-loop-example",
            dependencies: ["GRPCConnectionManager", "GRPCEchoServer", "CReactor"],
            path: "Examples/foreign-loop",
            swiftSettings: strictSwift
        ),
        // The echo proto's generated messages and grpc-swift-2 client (generated once, committed).
        .target(
            name: "EchoProto",
            dependencies: [
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            path: "Examples/grpc-swift-2/Sources/EchoProto",
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "grpc-swift-2-example",
            dependencies: [
                "GRPCConnectionManagerTransport", "GRPCConnectionManager", "GRPCEchoServer", "EchoProto",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
            ],
            path: "Examples/grpc-swift-2/Sources/Example",
            swiftSettings: strictSwift
        ),
        // Perf/: benchmark programs (no extra dependencies; `make bench-bus` runs the bus benchmark in release).
        .target(name: "CMallocCounter", path: "Perf/CMallocCounter"),
        .executableTarget(
            name: "bus-bench",
            dependencies: ["GRPCConnectionManager", "CMallocCounter"],
            path: "Perf/bus-bench",
            swiftSettings: strictSwift
        ),
        .testTarget(
            name: "GRPCConnectionManagerTests",
            dependencies: [
                "GRPCConnectionManager", "GRPCEchoServer", "CReactor", "CHTTP2Memory", "GRPCConnectionManagerPrometheus",
                "GRPCCMCompression", "GRPCConnectionManagerTransport", "EchoProto", "GRPCConnectionManagerServiceLifecycle",
                "GRPCConnectionManagerTracing",
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "InMemoryLogging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            // The Python peers the tests start (a scripted HTTP/2 peer, a DNS server), read from the source tree.
            exclude: ["Utilities/dns_server.py", "Utilities/scripted_peer.py"],
            swiftSettings: strictSwift
        ),
    ]
)
