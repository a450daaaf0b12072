import CNghttp2
@_spi(Reactor) import GRPCCMReactor
import GRPCCMTransport
import GRPCCMWire

/// The nghttp2 server session of an echo connection and its C callbacks (private top-level functions; user data
/// is the connection, unretained; stream user data is the stream, owned by the connection's table).
enum EchoServerSession {
    struct Failure: Error {
        let code: Int32
    }

    static func make(for connection: EchoServerConnection) throws -> OpaquePointer {
        var callbacks: OpaquePointer? = nil
        guard nghttp2_session_callbacks_new(&callbacks) == 0, let callbacks else { throw Failure(code: -901) }
        defer { nghttp2_session_callbacks_del(callbacks) }
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, serverOnBeginHeaders)
        nghttp2_session_callbacks_set_on_header_callback(callbacks, serverOnHeader)
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, serverOnFrameRecv)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, serverOnDataChunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, serverOnStreamClose)
        var option: OpaquePointer? = nil
        guard nghttp2_option_new(&option) == 0, let option else { throw Failure(code: -901) }
        defer { nghttp2_option_del(option) }
        // Streams with `x-hold-window` keep their window closed; every other one is consumed on arrival.
        nghttp2_option_set_no_auto_window_update(option, 1)
        var session: OpaquePointer? = nil
        let rc = nghttp2_session_server_new2(
            &session, callbacks, Unmanaged.passUnretained(connection).toOpaque(), option)
        guard rc == 0, let session else { throw Failure(code: rc) }
        var settings = [
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue),
                value: UInt32(clamping: connection.options.maxConcurrentStreams)),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue), value: UInt32(1 << 20)),
        ]
        nghttp2_submit_settings(session, 0, &settings, settings.count)
        nghttp2_session_set_local_window_size(session, 0, 0, Int32(8 << 20))
        return session
    }
}

@inline(__always)
private func serverConnection(_ userData: UnsafeMutableRawPointer?) -> EchoServerConnection {
    Unmanaged<EchoServerConnection>.fromOpaque(userData!).takeUnretainedValue()
}

@inline(__always)
private func serverStream(_ session: OpaquePointer?, _ streamID: Int32) -> EchoStream? {
    guard let pointer = nghttp2_session_get_stream_user_data(session, streamID) else { return nil }
    return Unmanaged<EchoStream>.fromOpaque(pointer).takeUnretainedValue()
}

private func serverOnBeginHeaders(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let header = frame!.pointee.hd
    guard header.type == UInt8(NGHTTP2_HEADERS.rawValue),
        frame!.pointee.headers.cat == NGHTTP2_HCAT_REQUEST
    else { return 0 }
    let stream = serverConnection(userData).beginStream(header.stream_id)
    nghttp2_session_set_stream_user_data(session, header.stream_id, Unmanaged.passUnretained(stream).toOpaque())
    return 0
}

private func serverOnHeader(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ name: UnsafePointer<UInt8>?,
    _ nameLength: Int, _ value: UnsafePointer<UInt8>?, _ valueLength: Int, _ flags: UInt8,
    _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    guard let stream = serverStream(session, frame!.pointee.hd.stream_id) else { return 0 }
    stream.header(
        name: String(decoding: UnsafeBufferPointer(start: name, count: nameLength), as: UTF8.self),
        value: String(decoding: UnsafeBufferPointer(start: value, count: valueLength), as: UTF8.self))
    return 0
}

private func serverOnFrameRecv(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let header = frame!.pointee.hd
    let type = UInt32(header.type)
    if type == NGHTTP2_SETTINGS.rawValue && header.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) == 0 {
        serverConnection(userData).prefaceReceived()  // nghttp2 checked the preface before it took this frame
        return 0
    }
    if type == NGHTTP2_DATA.rawValue && frame!.pointee.data.padlen > 0 {
        nghttp2_session_consume(session, header.stream_id, frame!.pointee.data.padlen)
    }
    guard type == NGHTTP2_HEADERS.rawValue || type == NGHTTP2_DATA.rawValue else { return 0 }
    if type == NGHTTP2_HEADERS.rawValue && frame!.pointee.headers.cat == NGHTTP2_HCAT_REQUEST {
        serverStream(session, header.stream_id)?.headersComplete()
    }
    if header.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0 {
        serverStream(session, header.stream_id)?.requestComplete()
    }
    return 0
}

private func serverOnDataChunk(
    _ session: OpaquePointer?, _ flags: UInt8, _ streamID: Int32, _ data: UnsafePointer<UInt8>?, _ length: Int,
    _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    nghttp2_session_consume_connection(session, length)
    let stream = serverStream(session, streamID)
    if let stream, stream.holdsWindow {
        stream.unconsumedBytes += length  // returned once its responses have gone out (`releaseWindow`)
    } else {
        nghttp2_session_consume_stream(session, streamID, length)
    }
    stream?.data(UnsafeRawBufferPointer(start: data, count: length))
    return 0
}

private func serverOnStreamClose(
    _ session: OpaquePointer?, _ streamID: Int32, _ errorCode: UInt32, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    serverConnection(userData).streamClosed(streamID)
    return 0
}
