import CNghttp2

/// Creates the nghttp2 client session of a connection and holds its C callbacks.
///
/// Every callback is a private top-level function (a C function pointer cannot capture context; see swift-notes
/// "Gotchas" 1). `user_data` is the connection, passed unretained: the connection owns the session and deletes it
/// before it goes away. Per-stream user data is the call, also unretained: the connection's stream table owns it
/// until nghttp2 reports the stream closed.
enum NGHTTP2ClientSession {
    struct Failure: Error, CustomStringConvertible {
        let code: Int32
        var description: String { String(cString: nghttp2_strerror(self.code)) }
    }

    static func make(for connection: HTTP2ClientConnection, configuration: Configuration) throws -> OpaquePointer {
        var callbacks: OpaquePointer? = nil
        guard nghttp2_session_callbacks_new(&callbacks) == 0, let callbacks else { throw Failure(code: -901) }
        defer { nghttp2_session_callbacks_del(callbacks) }
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, clientOnBeginHeaders)
        nghttp2_session_callbacks_set_on_header_callback(callbacks, clientOnHeader)
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, clientOnFrameRecv)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, clientOnDataChunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, clientOnStreamClose)

        var option: OpaquePointer? = nil
        guard nghttp2_option_new(&option) == 0, let option else { throw Failure(code: -901) }
        defer { nghttp2_option_del(option) }
        nghttp2_option_set_max_send_header_block_length(option, 64 << 10)
        // Window updates follow consumption (ClientCall.data and StreamBuffers), not arrival.
        nghttp2_option_set_no_auto_window_update(option, 1)

        var session: OpaquePointer? = nil
        let rc = nghttp2_session_client_new2(
            &session, callbacks, Unmanaged.passUnretained(connection).toOpaque(), option)
        guard rc == 0, let session else { throw Failure(code: rc) }

        let http2 = configuration.http2
        var settings = [
            nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_ENABLE_PUSH.rawValue), value: 0),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue),
                value: UInt32(http2.initialStreamWindowSize)),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_FRAME_SIZE.rawValue), value: UInt32(http2.maxFrameSize)),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue),
                value: UInt32(http2.maxHeaderListSize)),
        ]
        var result = nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &settings, settings.count)
        if result == 0 {
            result = nghttp2_session_set_local_window_size(
                session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, Int32(http2.connectionWindowSize))
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

@inline(__always)
private func streamCall(_ session: OpaquePointer?, _ streamID: Int32) -> ClientCall? {
    guard let pointer = nghttp2_session_get_stream_user_data(session, streamID) else { return nil }
    return Unmanaged<ClientCall>.fromOpaque(pointer).takeUnretainedValue()
}

private func clientOnBeginHeaders(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let header = frame!.pointee.hd
    if header.type == UInt8(NGHTTP2_HEADERS.rawValue) {
        streamCall(session, header.stream_id)?.beginHeaders()
    }
    return 0
}

private func clientOnHeader(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ name: UnsafePointer<UInt8>?,
    _ nameLength: Int, _ value: UnsafePointer<UInt8>?, _ valueLength: Int, _ flags: UInt8,
    _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let header = frame!.pointee.hd
    guard header.type == UInt8(NGHTTP2_HEADERS.rawValue), let call = streamCall(session, header.stream_id) else {
        return 0
    }
    call.header(
        name: UnsafeBufferPointer(start: name, count: nameLength),
        value: UnsafeBufferPointer(start: value, count: valueLength))
    return 0
}

private func clientOnFrameRecv(
    _ session: OpaquePointer?, _ frame: UnsafePointer<nghttp2_frame>?, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    let frame = frame!
    let header = frame.pointee.hd
    switch UInt32(header.type) {
    case NGHTTP2_DATA.rawValue:
        // Padding is never delivered to a call: give it back to both windows now.
        let padding = frame.pointee.data.padlen
        if padding > 0 { nghttp2_session_consume(session, header.stream_id, padding) }
    case NGHTTP2_HEADERS.rawValue:
        let endStream = header.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
        streamCall(session, header.stream_id)?.headersComplete(endStream: endStream)
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
        let debug =
            goAway.opaque_data_len > 0
            ? String(decoding: UnsafeBufferPointer(start: goAway.opaque_data, count: goAway.opaque_data_len), as: UTF8.self)
            : ""
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
    // The connection window is returned on arrival; the stream's follows the call's consumption.
    nghttp2_session_consume_connection(session, length)
    streamCall(session, streamID)?.data(UnsafeRawBufferPointer(start: data, count: length))
    return 0
}

private func clientOnStreamClose(
    _ session: OpaquePointer?, _ streamID: Int32, _ errorCode: UInt32, _ userData: UnsafeMutableRawPointer?
) -> Int32 {
    connection(userData)._withUnsafeGuaranteedRef { $0.streamClosed(streamID, errorCode: errorCode) }
    return 0
}

/// nghttp2 pulls the framed request through this.
private func clientReadRequest(
    _ session: OpaquePointer?, _ streamID: Int32, _ buffer: UnsafeMutablePointer<UInt8>?, _ length: Int,
    _ dataFlags: UnsafeMutablePointer<UInt32>?, _ source: UnsafeMutablePointer<nghttp2_data_source>?,
    _ userData: UnsafeMutableRawPointer?
) -> Int {
    let call = Unmanaged<ClientCall>.fromOpaque(source!.pointee.ptr!).takeUnretainedValue()
    var eof = false
    let written = call.readRequest(into: buffer!, length: length, eof: &eof)
    if eof { dataFlags!.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue }
    return written  // or NGHTTP2_ERR_DEFERRED: a request stream waits for its writer
}

/// The request headers every call of a connection shares (`:method`, `:scheme`, `:authority`, `te`,
/// `content-type`, `user-agent`), encoded once per connection in one small byte array.
struct RequestHeaderPrefix {
    let bytes: [UInt8]
    let fields: [(name: Range<Int>, value: Range<Int>)]

    init(authority: String, scheme: String, userAgent: String) {
        var bytes: [UInt8] = []
        var fields: [(name: Range<Int>, value: Range<Int>)] = []
        for (name, value) in [
            (":method", "POST"), (":scheme", scheme), (":authority", authority), ("te", "trailers"),
            ("content-type", "application/grpc"), ("user-agent", userAgent),
        ] {
            let nameStart = bytes.count
            bytes.append(contentsOf: name.utf8)
            let valueStart = bytes.count
            bytes.append(contentsOf: value.utf8)
            fields.append((nameStart..<valueStart, valueStart..<bytes.count))
        }
        self.bytes = bytes
        self.fields = fields
    }
}

/// Request headers, built in one reused byte buffer so that a call costs no allocation for its header block.
/// One per reactor (every submission happens on its thread, and nghttp2 copies the headers during
/// `nghttp2_submit_request`), so an idle connection carries none of its buffers.
///
/// Order (PROTOCOL-HTTP2.md): pseudo-headers, `te`, `grpc-timeout`, `content-type`, `user-agent`, then metadata.
struct HeaderScratch {
    private var bytes: [UInt8] = []
    private var fields: [(name: Range<Int>, value: Range<Int>)] = []
    private var nvs: [nghttp2_nv] = []

    init() {
        self.bytes.reserveCapacity(1024)
        self.fields.reserveCapacity(16)
        self.nvs.reserveCapacity(16)
    }

    private mutating func append(_ text: String) -> Range<Int> {
        let start = self.bytes.count
        self.bytes.append(contentsOf: text.utf8)
        return start..<self.bytes.count
    }

    mutating func submit(
        prefix: RequestHeaderPrefix, session: OpaquePointer, path: String, timeoutNanos: Int64?, metadata: Metadata,
        previousAttempts: Int, call: UnsafeMutableRawPointer
    ) -> Int32 {
        self.bytes.removeAll(keepingCapacity: true)
        self.bytes.append(contentsOf: prefix.bytes)
        self.fields.removeAll(keepingCapacity: true)
        self.fields.append(contentsOf: prefix.fields)
        // :path goes right after :scheme; grpc-timeout right after the pseudo-headers.
        let pathField = (name: self.append(":path"), value: self.append(path))
        var timeoutField: (name: Range<Int>, value: Range<Int>)? = nil
        if let timeout = timeoutNanos {
            timeoutField = (name: self.append("grpc-timeout"), value: self.append(GRPCTimeout.encode(nanoseconds: timeout)))
        }
        if previousAttempts > 0 {
            // gRFC A6: how many attempts came before this one.
            self.fields.append((name: self.append("grpc-previous-rpc-attempts"), value: self.append(String(previousAttempts))))
        }
        for entry in metadata {
            let name = self.append(entry.name)
            let start = self.bytes.count
            switch entry.value {
            case .string(let text): self.bytes.append(contentsOf: text.utf8)
            case .binary(let data): Base64.encode(data, into: &self.bytes)
            }
            self.fields.append((name: name, value: start..<self.bytes.count))
        }
        let fields = self.fields  // a retain, not a copy: the nv array is built in wire order from it
        return self.bytes.withUnsafeMutableBufferPointer { buffer -> Int32 in
            let base = buffer.baseAddress!
            self.nvs.removeAll(keepingCapacity: true)
            func add(_ field: (name: Range<Int>, value: Range<Int>)) {
                self.nvs.append(
                    nghttp2_nv(
                        name: base + field.name.lowerBound, value: base + field.value.lowerBound,
                        namelen: field.name.count, valuelen: field.value.count,
                        flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue)))
            }
            add(fields[0])  // :method
            add(fields[1])  // :scheme
            add(pathField)
            add(fields[2])  // :authority
            add(fields[3])  // te
            if let timeoutField { add(timeoutField) }
            for field in fields[4...] { add(field) }
            var provider = nghttp2_data_provider(
                source: nghttp2_data_source(ptr: call), read_callback: clientReadRequest)
            return self.nvs.withUnsafeBufferPointer { nva in
                nghttp2_submit_request(session, nil, nva.baseAddress, nva.count, &provider, call)
            }
        }
    }
}
