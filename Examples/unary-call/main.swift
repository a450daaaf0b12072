// A unary call through GRPCChannel: `swift run unary-call 127.0.0.1:50051` against `grpc-cm serve`.
import GRPCConnectionManager

let target = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "127.0.0.1:50051"
let channel = try GRPCChannel(target: target)
let response = await channel.unaryResult(
    path: "/echo.Echo/Get", request: Array("hello".utf8), options: RequestOptions(timeout: .seconds(5)))
if response.status.isOK {
    print("echoed: \(String(decoding: response.message, as: UTF8.self))")
} else {
    print("call failed: \(response.status)")
}
channel.close()
