import CNghttp2

/// Creates the nghttp2 client session of a connection and holds its C callbacks.
///
/// Every callback is a private top-level function (a C function pointer cannot capture context; see swift-notes
/// "Gotchas" 1). `user_data` is the connection, passed unretained: its socket owns the session and deletes it, never
/// while `mem_recv` runs, and keeps the connection alive for as long as `mem_recv` runs. Streams are found by id
/// through the connection (`handler(for:)`, unretained), so a stream whose owner reset it reaches nobody.
enum HTTP2ClientSessionFactory {
    struct Failure: Error, CustomStringConvertible {
        let code: Int32
        var description: String { String(cString: nghttp2_strerror(self.code)) }
    }

    static func make(
        for connection: HTTP2ClientConnection, settings: HTTP2ClientSettings, memory: HTTP2SessionMemory
    ) throws -> OpaquePointer {
        var callbacks: OpaquePointer? = nil
        guard nghttp2_session_callbacks_new(&callbacks) == 0, let callbacks else { throw Failure(code: -901) }
        defer { nghttp2_session_callbacks_del(callbacks) }
        nghttp2_session_callbacks_set_on_header_callback(callbacks, clientOnHeader)
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, clientOnFrameRecv)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, clientOnDataChunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, clientOnStreamClose)
        nghttp2_session_callbacks_set_send_data_callback(callbacks, clientSendRequestData)
        // Only on errors (with HTTP messaging off, only when the first frame is not SETTINGS): what nghttp2 found
        // wrong, for the status of the connection it then ends (the calls would read "closed by the server"). Its
        // other reasons travel in the GOAWAY it sends, read there (`HTTP2Socket.collectOutput`).
        nghttp2_session_callbacks_set_error_callback2(callbacks, clientOnError)
        // Only for frames against the rules, which nghttp2 answers with its own RST_STREAM (or GOAWAY).
        nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(callbacks, clientOnInvalidFrame)

        var option: OpaquePointer? = nil
        guard nghttp2_option_new(&option) == 0, let option else { throw Failure(code: -901) }
        defer { nghttp2_option_del(option) }
        nghttp2_option_set_max_send_header_block_length(option, HTTP2ClientConnection.maxSendHeaderBlockLength)
        // Window updates follow consumption (the stream handler's, through its handle), not arrival.
        nghttp2_option_set_no_auto_window_update(option, 1)
        // The response's HTTP rules are checked by the call's `ResponseHead`, as it reads the fields anyway.
        nghttp2_option_set_no_http_messaging(option, 1)

        var session: OpaquePointer? = nil
        let rc = memory.makeSession { mem in
            nghttp2_session_client_new3(&session, callbacks, Unmanaged.passUnretained(connection).toOpaque(), option, mem)
        }
        guard rc == 0, let session else { throw Failure(code: rc) }

        var entries = [
            // Not SETTINGS_NO_RFC7540_PRIORITIES (RFC 9218), though nghttp2's flat queue would save about 200
            // instructions a call over its dependency tree: under it nghttp2 1.52 never reschedules a client's stream
            // after a DATA frame, so a request stream that always has data and window (an upload faster than the
            // network) sends before every newer stream's request, and their calls stall until their deadlines. The
            // tree shares DATA between streams by weight.
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_ENABLE_PUSH.rawValue), value: 0),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue),
                value: UInt32(settings.initialStreamWindowSize)),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_FRAME_SIZE.rawValue), value: UInt32(settings.maxFrameSize)),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue),
                value: UInt32(settings.maxHeaderListSize)),
        ]
        var result = nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &entries, entries.count)
        if result == 0 {
            result = nghttp2_session_set_local_window_size(
                session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, Int32(settings.connectionWindowSize))
        }
        if result != 0 {
            nghttp2_session_del(session)
            throw Failure(code: result)
        }
        return session
    }
}

@inline(__always)
private func connection(_ userData: UnsafeMutableRawPointer?) -> Unmanaged<HTTP2ClientConnection> {
    Unmanaged<HTTP2ClientConnection>.fromOpaque(userData!)
}

/// Calls `body` with the handler of `streamID`, retaining neither it nor the connection (see `handler(for:)`); nil
/// when the stream has none (closed, or reset by its owner).
@inline(__always)
private func withHandler<Result>(
    _ userData: UnsafeMutableRawPointer?, _ streamID: Int32, _ body: (HTTP2StreamHandler) -> Result
) -> Result? {
    connection(userData)._withUnsafeGuaranteedRef { $0.handler(for: streamID) }?._withUnsafeGuaranteedRef(body)
}

private func clientOnHeader(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ name: UnsafePointer<UInt8>?,
    _ nameLength: Int, _ value: UnsafePointer<UInt8>?, _ valueLength: Int, _ flags: UInt8,
    _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let header = frame!.pointee.hd
    guard header.type == UInt8(NGHTTP2_HEADERS.rawValue) else { return 0 }
    let accepted =
        withHandler(userData, header.stream_id) {
            $0.streamHeader(
                name: UnsafeBufferPointer(start: name, count: nameLength),
                value: UnsafeBufferPointer(start: value, count: valueLength))
        } ?? true
    // A refused block (too large): nghttp2 resets the stream (INTERNAL_ERROR) and skips the rest of it, while HPACK
    // decoding goes on for the connection.
    return accepted ? 0 : Int32(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue)
}

private func clientOnError(
    _ session: OpaquePointer?, _ code: Int32, _ message: UnsafePointer<CChar>?, _ length: Int,
    _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let text = message.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: min(length, 256)), as: UTF8.self) }
    connection(userData).takeUnretainedValue().noteProtocolError(text ?? String(cString: nghttp2_strerror(code)))
    return 0
}

/// A frame nghttp2 found against HTTP/2's rules (a window overflowed, a frame in the wrong state): it resets the
/// stream itself. Noted so that the call says what the server did, and that this side reset the stream, rather than
/// "server reset the stream".
private func clientOnInvalidFrame(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ libErrorCode: Int32,
    _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let header = frame!.pointee.hd
    guard header.stream_id != 0 else { return 0 }
    let violation = "\(HTTP2FrameType.name(header.type)): \(String(cString: nghttp2_strerror(libErrorCode)))"
    connection(userData)._withUnsafeGuaranteedRef { $0.noteStreamViolation(header.stream_id, violation) }
    return 0
}

/// Frame type names for messages (RFC 9113 §6).
enum HTTP2FrameType {
    static func name(_ type: UInt8) -> String {
        let names = [
            "DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY", "WINDOW_UPDATE",
            "CONTINUATION",
        ]
        return Int(type) < names.count ? names[Int(type)] : "frame type \(type)"
    }
}

private func clientOnFrameRecv(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let frame = frame!
    let header = frame.pointee.hd
    switch UInt32(header.type) {
    case NGHTTP2_DATA.rawValue:
        // Padding needs nothing here: nghttp2 counts it (and the Pad Length byte) as consumed itself, even with
        // automatic WINDOW_UPDATE off. Consumed here too, it was given back twice, and the surplus granted window
        // for data an async reader had not read.
        if header.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0 {
            withHandler(userData, header.stream_id) { $0.streamDataEndedStream() }
        }
    case NGHTTP2_HEADERS.rawValue:
        let endStream = header.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
        withHandler(userData, header.stream_id) { $0.streamHeadersEnded(endStream: endStream) }
    case NGHTTP2_SETTINGS.rawValue:
        if header.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) == 0 {
            connection(userData)._withUnsafeGuaranteedRef { $0.settingsReceived() }
        }
    case NGHTTP2_PING.rawValue:
        if header.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) != 0 {
            connection(userData)._withUnsafeGuaranteedRef { $0.pingAcknowledged() }
        }
    case NGHTTP2_GOAWAY.rawValue:
        let goAway = frame.pointee.goaway
        let debug = goAwayDebugText(UnsafeBufferPointer(start: goAway.opaque_data, count: goAway.opaque_data_len))
        connection(userData)._withUnsafeGuaranteedRef {
            $0.goAwayReceived(lastStreamID: goAway.last_stream_id, errorCode: goAway.error_code, debugData: debug)
        }
    default:
        break
    }
    return 0
}

private func clientOnDataChunk(
    _ session: OpaquePointer?, _ flags: UInt8, _ streamID: Int32, _ data: UnsafePointer<UInt8>?, _ length: Int,
    _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    // The connection window is returned on arrival (once the read that brought it is handed over: `socketDidRead`);
    // the stream's follows the handler's consumption.
    connection(userData)._withUnsafeGuaranteedRef { $0.arrivedDataBytes += length }
    let consumed = withHandler(userData, streamID) { $0.streamData(UnsafeRawBufferPointer(start: data, count: length)) }
    if let consumed, consumed > 0, let session {
        connection(userData)._withUnsafeGuaranteedRef { $0.giveBackWindow(consumed, of: streamID, in: session) }
    }
    return 0
}

private func clientOnStreamClose(
    _ session: OpaquePointer?, _ streamID: Int32, _ errorCode: UInt32, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    connection(userData)._withUnsafeGuaranteedRef { $0.streamClosed(streamID, errorCode: errorCode) }
    return 0
}

/// nghttp2 pulls a request body through this (the data source's pointer is the connection).
func clientReadRequest(
    _ session: OpaquePointer?, _ streamID: Int32, _ buffer: UnsafeMutablePointer<UInt8>?, _ length: Int,
    _ dataFlags: UnsafeMutablePointer<UInt32>?, _ source: UnsafeMutablePointer<nghttp2_data_source>?,
    _ userData: UnsafeMutableRawPointer?
) -> Int {
    var eof = false
    guard
        let read = connection(userData)._withUnsafeGuaranteedRef({
            $0.readRequest(streamID, into: buffer!, length: length, eof: &eof)
        })
    else {
        // Reset by its owner while nghttp2 still held the request: end the body; the RST_STREAM follows.
        dataFlags!.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
        return 0
    }
    if eof { dataFlags!.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue }
    switch read {
    case .copied(let count):
        return count
    case .later(let count):
        // clientSendRequestData writes the frame when it goes out.
        dataFlags!.pointee |= NGHTTP2_DATA_FLAG_NO_COPY.rawValue
        return count
    case .waiting:
        return Int(NGHTTP2_ERR_DEFERRED.rawValue)
    }
}

/// A DATA frame whose payload the stream handed over as `.later`: its header and payload go straight into the
/// socket's output.
private func clientSendRequestData(
    _ session: OpaquePointer?, _ frame: UnsafeMutablePointer<nghttp2_frame>?, _ frameHeader: UnsafePointer<UInt8>?,
    _ length: Int, _ source: UnsafeMutablePointer<nghttp2_data_source>?, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    connection(userData)._withUnsafeGuaranteedRef {
        $0.sendRequestData(
            streamID: frame!.pointee.hd.stream_id, header: UnsafeRawBufferPointer(start: frameHeader, count: 9),
            length: length)
    }
}

/// A GOAWAY's debug data as text for status messages, events and logs: the peer's words, so at most 256 bytes of them
/// (a frame may carry megabytes, and every call the GOAWAY ends repeats them), control characters (C0, DEL, C1) as
/// "?" (a log line stays one line).
func goAwayDebugText(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
    guard !bytes.isEmpty else { return "" }
    let text = String(decoding: UnsafeBufferPointer(rebasing: bytes.prefix(256)), as: UTF8.self)
    var scalars = String.UnicodeScalarView()
    for scalar in text.unicodeScalars {
        scalars.append(scalar.properties.generalCategory == .control ? "?" : scalar)
    }
    return String(scalars)
}
