// The Go original's TLS example in Swift: TLS credentials, every feature on, a connection, the health map.
//   swift run tls-example 127.0.0.1:50443 ca.pem      (against `grpc-cm serve --tls-cert ... --tls-key ...`)
import GRPCConnectionManager
import GRPCConnectionManagerPrometheus

let arguments = CommandLine.arguments
let target = arguments.count > 1 ? arguments[1] : "localhost:50443"

var tls = TLSSettings()  // verified against the system trust store by default
if arguments.count > 2 { tls.trustRoots = .file(arguments[2]) }
if arguments.count > 3 { tls.serverName = arguments[3] }

var configuration = Configuration()
configuration.tls = tls
configuration.enableLogging = true
configuration.enableMetrics = true
configuration.enableRetry = true
configuration.enableCircuitBreaker = true

let metrics = PrometheusMetrics()
let manager = try ConnectionManager(configuration: configuration, metricsFactory: metrics)
let channel = try manager.connection(service: "echo", address: target)

let response = await channel.unaryResult(
    path: "/echo.Echo/Get", request: Array("hello over TLS".utf8), options: RequestOptions(timeout: .seconds(5)))
if response.status.isOK {
    print("echoed: \(String(decoding: response.message, as: UTF8.self))")
} else {
    print("call failed: \(response.status)")
}
for (service, health) in await manager.healthCheck().sorted(by: { $0.key < $1.key }) {
    print("Service: \(service), State: \(health.state), Healthy: \(health.healthy)\(health.error.map { ", Error: \($0)" } ?? "")")
}
await manager.close(gracePeriod: .seconds(2))
