// A generated grpc-swift-2 client (Examples/grpc-swift-2/Sources/EchoProto) calling the echo service through
// GRPCConnectionManagerTransport: one call of each kind.
//
//   swift run grpc-swift-2-example                 # against an embedded echo server started here
//   swift run grpc-swift-2-example 127.0.0.1:50051 # against any server of echo.Echo (e.g. grpc-cm serve)
import EchoProto
import GRPCConnectionManager
import GRPCConnectionManagerTransport
import GRPCCore
import GRPCEchoServer

let arguments = CommandLine.arguments.dropFirst()
var server: EchoServer?
let target: String
if let given = arguments.first {
    target = given
} else {
    server = try EchoServer()
    target = server!.address
    print("started the embedded echo server on \(target)")
}

let manager = try ConnectionManager()
let transport = try ManagedClientTransport(manager: manager, service: "echo", address: target)

try await withGRPCClient(transport: transport) { client in
    let echo = Echo_Echo.Client(wrapping: client)

    // Unary, with a deadline.
    var options = GRPCCore.CallOptions.defaults
    options.timeout = .seconds(5)
    let reply = try await echo.get(.with { $0.text = "hello" }, options: options)
    print("Get     -> \(reply.text)")

    // Server streaming: one response per word.
    try await echo.expand(.with { $0.text = "one two three" }) { response in
        for try await message in response.messages { print("Expand  -> \(message.text)") }
    }

    // Client streaming: the server joins what we send.
    let collected = try await echo.collect { writer in
        for word in ["a", "b", "c"] { try await writer.write(.with { $0.text = word }) }
    }
    print("Collect -> \(collected.text)")

    // Bidirectional: each request echoed as it arrives.
    try await echo.update { writer in
        for index in 1...3 { try await writer.write(.with { $0.text = "message \(index)" }) }
    } onResponse: { response in
        for try await message in response.messages { print("Update  -> \(message.text)") }
    }
}

await manager.close()
server?.close()
