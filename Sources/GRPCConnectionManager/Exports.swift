// The public API is this module plus the public types of the layers below it, re-exported so that
// `import GRPCConnectionManager` is all a user writes. The layers themselves stay separate targets, so the compiler
// holds every arrow pointing down:
//
//   GRPCConnectionManager   manager, channels, configuration, health client (this module)
//   GRPCCMHandlers          retry, circuit breaker, metrics, logging
//   GRPCCMPool              subchannels, connection state machine, picking, the wait queue
//   GRPCCMCalls             a call and its attempts, stream buffers, the event bus
//   GRPCCMTransport         HTTP/2 (nghttp2) and TLS (OpenSSL) over a socket
//   GRPCCMCompression       gzip and deflate (zlib) for messages
//   GRPCCMWire              gRPC's wire rules and vocabulary: status, metadata, framing, timeouts
//   GRPCCMReactor           the event loop over the C reactor
@_exported import GRPCCMCalls
@_exported import GRPCCMHandlers
@_exported import GRPCCMPool
@_exported import GRPCCMReactor
@_exported import GRPCCMTransport
@_exported import GRPCCMWire
