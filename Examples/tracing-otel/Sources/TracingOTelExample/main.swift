// Client spans for gRPC calls, exported with swift-otel over OTLP/HTTP (by default to localhost:4318; set
// OTEL_EXPORTER_OTLP_ENDPOINT for another collector). Calls go to the embedded echo server, which sends the request
// metadata back: the program prints the W3C `traceparent` each call carried.
import GRPCConnectionManager
import GRPCConnectionManagerTracing
import GRPCEchoServer
import OTel
import Tracing

var configuration = OTel.Configuration.default
configuration.serviceName = "grpc-cm-tracing-example"
configuration.logs.enabled = false
configuration.metrics.enabled = false
configuration.traces.batchSpanProcessor.scheduleDelay = .milliseconds(200)
let observability = try OTel.bootstrap(configuration: configuration)

let server = try EchoServer()
let channel = try GRPCChannel(target: server.address, interceptors: [TracingInterceptor()])

try await withThrowingTaskGroup(of: Void.self) { group in
    group.addTask { try await observability.run() }
    try await withSpan("checkout") { _ in
        for item in ["apple", "pear", "plum"] {
            let response = try await channel.unary(path: "/echo.Echo/Get", request: Array(item.utf8))
            print("\(item): traceparent \(response.initialMetadata["traceparent"] ?? "(none)")")
        }
    }
    // Give the batch processor time to export, then stop.
    try await Task.sleep(for: .seconds(1))
    group.cancelAll()
}
channel.close()
server.close()
