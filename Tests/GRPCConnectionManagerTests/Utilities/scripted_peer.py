"""A scripted HTTP/2 server that misbehaves on purpose, frame by frame (hyperframe and hpack, from the h2 package).

    python3 scripted_peer.py [--tls CERT KEY] MODE [ARG ...]

Prints its port, then serves until stdin closes; with --tls, over TLS with ALPN h2. The line "count" on stdin prints
how many request header blocks it has received; "bodiless" prints the most streams one connection ever had at once
whose request headers had arrived and whose body had not begun (no DATA frame yet). What it observes goes to stdout as "event ..." lines: a GOAWAY
from the client ("event goaway"), how each connection ended ("event close_notify", "event eof"), and a failed TLS
handshake with the reason the client's alert gave ("event handshake-failed REASON"), the TLS server name the client
sent ("event sni NAME", "event sni -" for none) and each request's :authority ("event authority VALUE"). Every stream is answered as an echo server would (the request message back, grpc-status 0) unless the
mode says otherwise:

  echo                 nothing else: every stream is echoed
  headers-bytes N      response headers carry an extra field of N bytes (CONTINUATION frames as needed); the
                       health Watch's too (SERVING)
  trailers-bytes N     the trailers do
  status CODE          a trailers-only response with grpc-status CODE (any text)
  compressed ENC       grpc-encoding ENC, and the message flagged compressed (but not compressed)
  bomb N               grpc-encoding gzip, and a message of N zero bytes gzipped (a small "compression bomb")
  health-flap [CODE]   grpc.health.v1 Watch: the first stream says SERVING then ends (UNAVAILABLE, or CODE), later ones say
                       SERVING and stay open ("event watch N at T" for each, T in seconds); other calls are echoed
  health-cycle MS      grpc.health.v1 Watch: every stream says SERVING, then ends (UNAVAILABLE) after MS milliseconds, as
                       a proxy ends long streams ("event watch N at T" for each); other calls are echoed
  health-fail CODE     grpc.health.v1 Watch: every stream ends with a trailers-only grpc-status CODE, saying nothing
                       ("event watch N at T" for each); other calls are echoed
  health-silent        grpc.health.v1 Watch and Check: never answered (the stream stays open, silent); other calls are
                       echoed
  bin-joined           x-data-bin in the headers: two base64 values joined with ", " in one field
  max-header-list N    SETTINGS_MAX_HEADER_LIST_SIZE = N
  refuse N             RST_STREAM REFUSED_STREAM for the first N streams (never processed)
  goaway LAST          once LAST+2 requests are in: GOAWAY(last stream id LAST), answer only streams <= LAST
  no-ping-ack          answers streams, never answers a PING (a keepalive that times out)
  quiet-then-stream QUIET_MS COUNT EVERY_MS
                       never answers a PING; each stream gets response headers at once, QUIET_MS of silence, then
                       COUNT one-byte messages EVERY_MS apart and OK
  observe              SETTINGS only; reports what the client sends before it goes
  late-first           holds the answer to stream 1 until another request arrives, then sends it ("stale", OK)
                       before answering the new one (an old attempt's frames arriving during its retry)
  wide-open-stall [once] [goaway]
                       windows of 2^31-1 (stream and connection), then stops reading once a request's headers are
                       in ("event stalled"): the client may send as fast as it can produce, and the socket backs up;
                       with "once", one connection is accepted and later ones are refused; with "goaway", a
                       GOAWAY(NO_ERROR, last stream = that one) goes first
  wide-open-slow MS    windows of 2^31-1 (stream and connection), reads one frame every MS milliseconds and answers as
                       the echo does: a client upload always has window, and its socket backs up
  headers-then-status CODE MS
                       response headers at once, trailers with grpc-status CODE after MS milliseconds
  padded FRAMES        a 64 KiB message, then one in FRAMES DATA frames of 256 bytes each padded with 255; reports
                       each WINDOW_UPDATE it receives ("event window STREAM INCREMENT")
  early-status CODE    a trailers-only grpc-status CODE as soon as a request's headers are in, before its body
  data-end             as soon as a request's headers are in: response headers, then the message "x" in
                       a DATA frame that ends the stream, without trailers; reads on
  malformed CASE       the first stream gets one broken or non-gRPC answer (see malformed_answer), later ones the echo
  drop-after-settings  closes each connection as soon as the client has acknowledged its SETTINGS (the client is
                       READY then), with "event accepted" for each
  goaway-after-settings [N]
                       likewise sends GOAWAY(0) then (with N bytes of debug data, lines of text), and closes when the
                       client does
  status-and-reset CODE
                       windows as wide-open-stall; once a request's headers are in, a trailers-only grpc-status CODE,
                       then closes without reading the request's body (the kernel resets the connection)
  silent               takes each connection and its preface ("event accepted"), then says nothing and reads on, never
                       sending SETTINGS: the client's attempt never connects (a blackholed address, as far as HTTP/2
                       goes); "event eof" when the client closes
  goaway-and-reset     windows as wide-open-stall; once a request's headers are in: GOAWAY(last stream = that one,
                       ENHANCE_YOUR_CALM, debug "going"), then closes without reading the request's body (a reset)
  answer-and-reset BYTES
                       windows as wide-open-stall; once a request's headers are in: response headers, one message
                       of BYTES bytes and trailers with grpc-status 0, then closes without reading the request's body
                       (the kernel resets the connection with the answer still in the client's receive queue)
  refuse-then-goaway   on the first connection, the first request's headers get RST_STREAM REFUSED_STREAM and
                       GOAWAY(last stream 0) in one write (one read for the client); later connections are echoed
  window-overflow      each stream gets response headers, then a WINDOW_UPDATE that overflows its window (2^31-1)
  http1                answers the client's preface with an HTTP/1.1 400 and closes (with --tls: a TLS terminator
                       that offers h2 in front of an HTTP/1.1 server)
  enable-push          its SETTINGS enable server push, which a server must not (a connection error for the client)
  continuation-flood [BYTES]
                       the first connection's first request gets response headers in a HEADERS frame without
                       END_HEADERS, then CONTINUATION frames until the client closes ("event flood-cut FRAMES"):
                       empty ones, or with BYTES, each one header field (x-pad) of about BYTES bytes; later
                       connections are echoed
  random SEED          random but well-framed answers (headers where they don't belong, DATA after trailers,
                       huge header blocks, resets, window abuse, GOAWAY, silence)
"""
import base64, fcntl, gzip, random, socket, ssl, struct, sys, termios, threading, time

from hpack import Encoder, Decoder
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              RstStreamFrame, SettingsFrame, WindowUpdateFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ARGV = sys.argv[1:]
TLS = None
if ARGV and ARGV[0] == "--tls":
    TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    TLS.load_cert_chain(ARGV[1], ARGV[2])
    TLS.set_alpn_protocols(["h2"])
    TLS.sni_callback = lambda sock, name, context: event("sni " + (name or "-"))
    ARGV = ARGV[3:]
MODE = ARGV[0]
ARGS = ARGV[1:]


BOMB = gzip.compress(b"\0" * int(ARGS[0])) if MODE == "bomb" else b""


def event(text):
    with lock:
        print("event " + text, flush=True)
lock = threading.Lock()
header_blocks = 0
most_bodiless = 0
watches = 0


def hpack_int(value, prefix_bits, first=0):
    """An HPACK integer (RFC 7541 §5.1) with `first`'s high bits on its first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    return bytes(out + [value])


def hpack_literal(name, value):
    """A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def grpc_frame(message, compressed=False):
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(message)) + message


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class Connection:
    def __init__(self, sock, seed):
        self.sock = sock
        self.serial = seed  # 1 for the first connection (but in random mode)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.decoder.max_header_list_size = 1 << 30
        self.rng = random.Random(seed)
        self.streams = {}  # stream id -> {"headers": [...], "body": bytes}
        self.requests = 0
        self.bodiless = 0  # streams whose headers are in and whose body has not begun
        self.send_lock = threading.RLock()  # reentrant: send_headers holds it across HPACK encoding and the send
        self.max_frame = 16384

    def send(self, frame):
        with self.send_lock:
            self.sock.sendall(frame.serialize())

    def send_raw(self, data):
        with self.send_lock:
            self.sock.sendall(data)

    def send_headers(self, stream_id, headers, end_stream=False):
        # The HPACK encoder is the connection's state: a delayed answer from a timer thread must not interleave.
        with self.send_lock:
            self._send_headers(stream_id, headers, end_stream)

    def _send_headers(self, stream_id, headers, end_stream):
        block = self.encoder.encode(headers, huffman=False)
        first, rest = block[:self.max_frame], block[self.max_frame:]
        frame = HeadersFrame(stream_id)
        frame.data = first
        if end_stream:
            frame.flags.add("END_STREAM")
        if not rest:
            frame.flags.add("END_HEADERS")
        out = frame.serialize()
        while rest:
            chunk, rest = rest[:self.max_frame], rest[self.max_frame:]
            cont = ContinuationFrame(stream_id)
            cont.data = chunk
            if not rest:
                cont.flags.add("END_HEADERS")
            out += cont.serialize()
        self.send_raw(out)

    def send_data(self, stream_id, data, end_stream=False):
        while True:
            chunk, data = data[:self.max_frame], data[self.max_frame:]
            frame = DataFrame(stream_id)
            frame.data = chunk
            if end_stream and not data:
                frame.flags.add("END_STREAM")
            self.send(frame)
            if not data:
                return

    def serve(self):
        if read_exact(self.sock, len(PREFACE)) != PREFACE:
            return
        if MODE == "silent":
            event("accepted")
            while self.sock.recv(65536):
                pass
            raise EOFError
        if MODE == "http1":
            self.send_raw(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\nConnection: close\r\n\r\nBad Request")
            return
        settings = SettingsFrame(0)
        if MODE == "enable-push":
            settings.settings[SettingsFrame.ENABLE_PUSH] = 1
        if MODE == "max-header-list":
            settings.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] = int(ARGS[0])
        wide_open = ("wide-open-stall", "wide-open-slow", "status-and-reset", "answer-and-reset", "goaway-and-reset")
        if MODE in wide_open:
            settings.settings[SettingsFrame.INITIAL_WINDOW_SIZE] = (1 << 31) - 1
        self.send(settings)
        if MODE in wide_open:
            update = WindowUpdateFrame(0)
            update.window_increment = (1 << 31) - 1 - 65535
            self.send(update)
        pending_block = {}
        while True:
            header = read_exact(self.sock, 9)
            frame, length = Frame.parse_frame_header(memoryview(header))
            body = read_exact(self.sock, length)
            frame.parse_body(memoryview(body))
            if isinstance(frame, SettingsFrame):
                if "ACK" in frame.flags and MODE in ("drop-after-settings", "goaway-after-settings"):
                    event("accepted")
                    if MODE == "drop-after-settings":
                        return
                    goaway = GoAwayFrame(0)
                    goaway.last_stream_id = 0
                    if ARGS:
                        goaway.additional_data = (b"no more\r\n" * (int(ARGS[0]) // 9 + 1))[:int(ARGS[0])]
                    self.send(goaway)
                if "ACK" not in frame.flags:
                    event("settings " + " ".join("%d=%d" % item for item in sorted(frame.settings.items())))
                    ack = SettingsFrame(0)
                    ack.flags.add("ACK")
                    self.send(ack)
            elif isinstance(frame, GoAwayFrame):
                event("goaway")
            elif isinstance(frame, WindowUpdateFrame) and MODE == "padded":
                event("window %d %d" % (frame.stream_id, frame.window_increment))
            elif isinstance(frame, PingFrame):
                if "ACK" not in frame.flags and MODE not in ("no-ping-ack", "quiet-then-stream"):
                    pong = PingFrame(0)
                    pong.flags.add("ACK")
                    pong.opaque_data = frame.opaque_data
                    self.send(pong)
            elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
                pending_block[frame.stream_id] = pending_block.get(frame.stream_id, b"") + frame.data
                if isinstance(frame, HeadersFrame):
                    self.streams[frame.stream_id] = {"body": b"", "end": "END_STREAM" in frame.flags}
                if "END_HEADERS" in frame.flags:
                    headers = self.decoder.decode(pending_block.pop(frame.stream_id))
                    self.streams[frame.stream_id]["headers"] = headers
                    event("authority " + dict(headers).get(":authority", "-"))
                    global header_blocks, most_bodiless
                    if not self.streams[frame.stream_id]["end"]:
                        self.streams[frame.stream_id]["bodiless"] = True
                        self.bodiless += 1
                    with lock:
                        header_blocks += 1
                        most_bodiless = max(most_bodiless, self.bodiless)
                    self.requests += 1
                    if MODE == "wide-open-stall":
                        if "goaway" in ARGS:
                            goaway = GoAwayFrame(0)
                            goaway.last_stream_id = frame.stream_id
                            self.send_raw(goaway.serialize())
                        event("stalled")
                        while True:
                            time.sleep(3600)
                    if MODE == "status-and-reset":
                        self.send_headers(frame.stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                                            ("grpc-status", ARGS[0])], end_stream=True)
                        event("reset")
                        return  # closed with the request's body unread: a reset
                    if MODE == "goaway-and-reset":
                        goaway = GoAwayFrame(0)
                        goaway.last_stream_id = frame.stream_id
                        goaway.error_code = 11  # ENHANCE_YOUR_CALM
                        goaway.additional_data = b"going"
                        self.send_raw(goaway.serialize())
                        event("reset")
                        return  # closed with the request's body unread: a reset
                    if MODE == "refuse-then-goaway" and self.serial == 1 and self.requests == 1:
                        refuse = RstStreamFrame(frame.stream_id)
                        refuse.error_code = 7  # REFUSED_STREAM
                        goaway = GoAwayFrame(0)
                        goaway.last_stream_id = 0
                        self.send_raw(refuse.serialize() + goaway.serialize())
                        self.streams[frame.stream_id]["answered"] = True
                        continue
                    if MODE == "answer-and-reset":
                        self.send_headers(frame.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                        self.send_data(frame.stream_id, grpc_frame(b"a" * int(ARGS[0])))
                        self.send_headers(frame.stream_id, [("grpc-status", "0")], end_stream=True)
                        # Every byte taken by the client's kernel before the reset, which drops what is still unsent.
                        while struct.unpack("i", fcntl.ioctl(self.sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0] > 0:
                            time.sleep(0.001)
                        event("reset")
                        return  # closed with the request's body unread: a reset
                    if MODE == "continuation-flood" and self.serial == 1 and self.requests == 1:
                        block = self.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
                        start = HeadersFrame(frame.stream_id)
                        start.data = block
                        payload = hpack_literal(b"x-pad", b"a" * (int(ARGS[0]) - 16)) if ARGS else b""
                        continuation = (struct.pack(">I", len(payload))[1:] + bytes([9, 0])
                                        + struct.pack(">I", frame.stream_id) + payload)
                        batch = 1 if payload else 1024
                        sent = 0
                        try:
                            self.send_raw(start.serialize())
                            while True:
                                self.send_raw(continuation * batch)
                                sent += batch
                        except OSError:
                            event("flood-cut %d" % sent)
                            return
                    if MODE == "data-end":
                        self.streams[frame.stream_id]["answered"] = True
                        self.send_headers(frame.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                        self.send_data(frame.stream_id, grpc_frame(b"x"), end_stream=True)
                        continue
                    if MODE == "early-status":
                        # A trailers-only answer at once, before the request's body has arrived.
                        self.streams[frame.stream_id]["answered"] = True
                        self.send_headers(frame.stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                                            ("grpc-status", ARGS[0])], end_stream=True)
                    elif self.streams[frame.stream_id]["end"]:
                        self.answer(frame.stream_id)
            elif isinstance(frame, DataFrame):
                stream = self.streams.get(frame.stream_id)
                if stream is not None and stream.pop("bodiless", False):
                    self.bodiless -= 1
                if stream is not None and (MODE != "wide-open-slow" or len(stream["body"]) < 1 << 20):
                    stream["body"] += frame.data
                if MODE == "wide-open-slow":
                    time.sleep(int(ARGS[0]) / 1000)  # windows wide open: nothing to give back
                elif frame.flow_controlled_length:
                    for sid in (0, frame.stream_id):
                        update = WindowUpdateFrame(sid)
                        update.window_increment = frame.flow_controlled_length
                        self.send(update)
                if "END_STREAM" in frame.flags and stream is not None and not stream.get("answered"):
                    self.answer(frame.stream_id)

    def message(self, stream_id):
        body = self.streams[stream_id]["body"]
        return body[5:] if len(body) >= 5 else b""

    def echo(self, stream_id, extra_headers=(), extra_trailers=(), compressed=None):
        headers = [(":status", "200"), ("content-type", "application/grpc")] + list(extra_headers)
        if compressed:
            headers.append(("grpc-encoding", compressed))
        self.send_headers(stream_id, headers)
        self.send_data(stream_id, grpc_frame(self.message(stream_id), compressed is not None))
        self.send_headers(stream_id, [("grpc-status", "0")] + list(extra_trailers), end_stream=True)

    def answer(self, stream_id):
        path = dict((k.decode() if isinstance(k, bytes) else k, v) for k, v in self.streams[stream_id].get("headers", [])).get(":path")
        path = path.decode() if isinstance(path, bytes) else path
        if MODE == "health-silent" and path in ("/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/Check"):
            return  # never a word: the client's health check waits
        if MODE in ("health-flap", "health-fail", "health-cycle") and path == "/grpc.health.v1.Health/Watch":
            global watches
            with lock:
                watches += 1
                count = watches
            event("watch %d at %.3f" % (count, time.monotonic()))
            if MODE == "health-fail":
                self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                              ("grpc-status", ARGS[0]), ("grpc-message", "health service broken")],
                                  end_stream=True)
                return
            self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            self.send_data(stream_id, grpc_frame(b"\x08\x01"))  # SERVING
            if MODE == "health-cycle":
                threading.Timer(int(ARGS[0]) / 1000.0, lambda: self.send_headers(
                    stream_id, [("grpc-status", "14"), ("grpc-message", "stream timeout")], end_stream=True)).start()
                return
            if count == 1:
                self.send_headers(stream_id, [("grpc-status", ARGS[0] if ARGS else "14"),
                                              ("grpc-message", "health service restarting")],
                                  end_stream=True)
            return
        if MODE == "headers-bytes" and path == "/grpc.health.v1.Health/Watch":
            # The health Watch's answer is as big: SERVING, with the same extra field.
            self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                          ("x-big", "a" * int(ARGS[0]))])
            self.send_data(stream_id, grpc_frame(b"\x08\x01"))
        elif MODE == "headers-bytes":
            self.echo(stream_id, extra_headers=[("x-big", "a" * int(ARGS[0]))])
        elif MODE == "trailers-bytes":
            self.echo(stream_id, extra_trailers=[("x-big", "a" * int(ARGS[0]))])
        elif MODE == "status":
            self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                          ("grpc-status", ARGS[0]), ("grpc-message", "scripted")], end_stream=True)
        elif MODE == "compressed":
            self.echo(stream_id, compressed=ARGS[0])
        elif MODE == "bomb":
            headers = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-encoding", "gzip")]
            self.send_headers(stream_id, headers)
            self.send_data(stream_id, grpc_frame(BOMB, True))
            self.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        elif MODE == "bin-joined":
            joined = base64.b64encode(b"\x01\x02\x03").decode() + ", " + base64.b64encode(b"\xff\xfe").decode().rstrip("=")
            self.echo(stream_id, extra_headers=[("x-data-bin", joined)])
        elif MODE == "refuse":
            if self.requests <= int(ARGS[0]):
                frame = RstStreamFrame(stream_id)
                frame.error_code = 7  # REFUSED_STREAM
                self.send(frame)
            else:
                self.echo(stream_id)
        elif MODE == "goaway":
            last = int(ARGS[0])
            # Hold the answers until LAST+2 requests are in, then GOAWAY and answer only the processed ones.
            if self.requests < last + 2:
                return
            frame = GoAwayFrame(0)
            frame.last_stream_id = last
            frame.error_code = 0
            self.send(frame)
            for sid in sorted(self.streams):
                if sid <= last and "headers" in self.streams[sid]:
                    self.echo(sid)
        elif MODE == "malformed":
            if self.requests == 1:
                self.malformed_answer(stream_id, ARGS[0])
            else:
                self.echo(stream_id)
        elif MODE == "random":
            self.random_answer(stream_id)
        elif MODE == "observe":
            pass
        elif MODE == "headers-then-status":
            # Response headers at once, then after MS milliseconds (from another thread) trailers with CODE.
            self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            code, delay = ARGS[0], int(ARGS[1]) / 1000.0
            threading.Timer(delay, lambda: self.send_headers(stream_id, [("grpc-status", code)], end_stream=True)).start()
        elif MODE == "window-overflow":
            self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            update = WindowUpdateFrame(stream_id)
            update.window_increment = (1 << 31) - 1
            self.send(update)
        elif MODE == "quiet-then-stream":
            # Response headers at once; QUIET_MS of silence; COUNT messages EVERY_MS apart; OK. PINGs are never
            # answered: the data is the only sign of life.
            self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            quiet, count, every = int(ARGS[0]) / 1000.0, int(ARGS[1]), int(ARGS[2]) / 1000.0

            def stream(stream_id=stream_id):
                time.sleep(quiet)
                for index in range(count):
                    self.send_data(stream_id, grpc_frame(bytes([index % 256])))
                    time.sleep(every)
                self.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
            threading.Thread(target=stream, daemon=True).start()
        elif MODE == "padded":
            # A 64 KiB message, then one of FRAMES x 256 bytes in DATA frames each padded with 255 bytes (half of
            # every frame's flow-controlled bytes is padding), then OK.
            self.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            self.send_data(stream_id, grpc_frame(b"f" * 65536))
            body = grpc_frame(b"p" * (int(ARGS[0]) * 256 - 5))
            while body:
                chunk, body = body[:256], body[256:]
                frame = DataFrame(stream_id)
                frame.data = chunk
                frame.pad_length = 255
                frame.flags.add("PADDED")
                self.send(frame)
            self.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        elif MODE == "late-first":
            if stream_id == 1:
                return
            self.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
            self.send_data(1, grpc_frame(b"stale"))
            self.send_headers(1, [("grpc-status", "0")], end_stream=True)
            self.echo(stream_id)
        else:
            self.echo(stream_id)

    def malformed_answer(self, stream_id, case):
        """A response that breaks one of HTTP/2's rules for responses (RFC 9113 section 8)."""
        ok = [(":status", "200"), ("content-type", "application/grpc")]
        message = grpc_frame(self.message(stream_id))
        if case == "upper-case-name":
            self.send_headers(stream_id, ok + [("X-Upper", "v")])
        elif case == "crlf-value":
            self.send_headers(stream_id, ok + [("x-bad", "a\r\nx-injected: 1")])
        elif case == "pseudo-in-trailers":
            self.send_headers(stream_id, ok)
            self.send_data(stream_id, message)
            self.send_headers(stream_id, [(":status", "200"), ("grpc-status", "0")], end_stream=True)
            return
        elif case == "no-status":
            self.send_headers(stream_id, [("content-type", "application/grpc")])
        elif case == "connection-header":
            self.send_headers(stream_id, ok + [("connection", "keep-alive")])
        elif case == "data-after-informational":
            self.send_headers(stream_id, [(":status", "100")])
        elif case == "trailers-without-end-stream":
            self.send_headers(stream_id, ok)
            self.send_data(stream_id, message)
            self.send_headers(stream_id, [("grpc-status", "0")])
            return
        elif case.startswith("http-"):
            # An HTTP answer that is not gRPC, such as a proxy's error page: http-STATUS-TYPE[-end] (end: no body,
            # END_STREAM on the headers).
            _, status, kind = case.split("-")[:3]
            content_type = {"html": "text/html", "plain": "text/plain", "grpcweb": "application/grpc-web+proto",
                            "grpcproto": "application/grpc+proto", "grpcparam": "application/grpc; charset=x"}[kind]
            if case.endswith("-end"):
                self.send_headers(stream_id, [(":status", status), ("content-type", content_type)], end_stream=True)
                return
            self.send_headers(stream_id, [(":status", status), ("content-type", content_type)])
            if kind.startswith("grpc"):
                self.send_data(stream_id, message)
                self.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
            else:
                self.send_data(stream_id, b"upstream connect error or disconnect/reset before headers", end_stream=True)
            return
        elif case in ("status-in-headers-then-reset", "status-in-headers-then-end"):
            # A grpc-status in the response headers, then no trailers: the stream is reset, or its DATA ends it.
            self.send_headers(stream_id, ok + [("grpc-status", "0")])
            if case.endswith("reset"):
                self.send_data(stream_id, message)
                frame = RstStreamFrame(stream_id)
                frame.error_code = 2  # INTERNAL_ERROR
                self.send(frame)
            else:
                self.send_data(stream_id, message, end_stream=True)
            return
        elif case == "trailers-without-status":
            self.send_headers(stream_id, ok)
            self.send_data(stream_id, message)
            self.send_headers(stream_id, [("x-trailer", "v"), ("grpc-message", "quota exceeded")], end_stream=True)
            return
        elif case == "message-ends-with-space":
            # grpc-go sends a message as it is when it needs no percent-encoding, spaces included.
            self.send_headers(stream_id, ok + [("x-pad", " v "), ("grpc-status", "5"), ("grpc-message", "invalid name: ")],
                              end_stream=True)
            return
        elif case == "trailers-only-without-status":
            self.send_headers(stream_id, ok + [("x-trailer", "v")], end_stream=True)
            return
        elif case == "informational-then-ok":
            self.send_headers(stream_id, [(":status", "100")])
            self.echo(stream_id)
            return
        self.send_data(stream_id, message)
        self.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)

    def random_answer(self, stream_id):
        rng = self.rng
        actions = rng.randint(1, 6)
        for _ in range(actions):
            choice = rng.randrange(14)
            sid = stream_id if rng.random() < 0.85 else rng.choice([0, stream_id + 2, 1, stream_id])
            if choice == 0:
                self.send_headers(sid, [(":status", rng.choice(["200", "200", "404", "503", "100", "xyz"])),
                                        ("content-type", rng.choice(["application/grpc", "text/html"]))],
                                  end_stream=rng.random() < 0.2)
            elif choice == 1:
                junk = [(rng.choice(["x-junk", "grpc-status", "grpc-message", "grpc-encoding", "te", "x-bin-bin",
                                     "content-type", ":path"]),
                         "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(0, 40))))
                        for _ in range(rng.randrange(0, 5))]
                self.send_headers(sid, junk, end_stream=rng.random() < 0.5)
            elif choice == 2:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
                if rng.random() < 0.5:
                    payload = grpc_frame(payload, rng.random() < 0.2)
                self.send_data(sid, payload, end_stream=rng.random() < 0.3)
            elif choice == 3:
                self.send_data(sid, grpc_frame(self.message(stream_id)))
            elif choice == 4:
                self.send_headers(sid, [("grpc-status", str(rng.randrange(-3, 40))),
                                        ("grpc-message", "%" + "".join(rng.choice("0123456789ABCDEFZ%") for _ in range(6)))],
                                  end_stream=True)
            elif choice == 5:
                frame = RstStreamFrame(sid if sid else stream_id)
                frame.error_code = rng.randrange(0, 16)
                self.send(frame)
            elif choice == 6:
                frame = WindowUpdateFrame(rng.choice([0, sid]))
                frame.window_increment = rng.choice([1, 1 << 30, (1 << 31) - 1])
                self.send(frame)
            elif choice == 7:
                frame = GoAwayFrame(0)
                frame.last_stream_id = rng.choice([0, stream_id, stream_id - 2 if stream_id > 2 else 0])
                frame.error_code = rng.randrange(0, 14)
                self.send(frame)
            elif choice == 8:
                self.send_headers(sid, [("x-huge", "h" * rng.randrange(10000, 70000))])
            elif choice == 9:
                ping = PingFrame(0)
                ping.opaque_data = bytes(8)
                self.send(ping)
            elif choice == 10:
                settings = SettingsFrame(0)
                settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] = rng.randrange(0, 4)
                settings.settings[SettingsFrame.INITIAL_WINDOW_SIZE] = rng.choice([0, 1, 65535, (1 << 31) - 1])
                self.send(settings)
            elif choice == 11:
                self.echo(stream_id)
            elif choice == 12:
                pass  # silence: the caller's deadline ends it
            else:
                # DATA after the trailers, and trailers twice.
                self.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                self.send_data(sid, b"\x00\x00\x00\x00\x01z", end_stream=True)


def accept_loop(listener):
    seed = int(ARGS[0]) if MODE == "random" else 0
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seed += 1

        def run(sock=sock, seed=seed):
            connection = None
            try:
                if TLS is not None:
                    try:
                        sock = TLS.wrap_socket(sock, server_side=True, suppress_ragged_eofs=False)
                    except ssl.SSLError as error:
                        event("handshake-failed " + (error.reason or str(error)))
                        return
                connection = Connection(sock, seed)
                connection.serve()
            except ssl.SSLZeroReturnError:
                event("close_notify")
            except ssl.SSLEOFError:
                event("eof")  # TLS ended without close_notify
            except EOFError:
                # A TLS socket reads b"" only after close_notify (ragged EOFs raise SSLEOFError above).
                event("close_notify" if TLS is not None else "eof")
            except Exception:
                pass
            finally:
                try:
                    sock.close()
                except OSError:
                    pass
        threading.Thread(target=run, daemon=True).start()
        if MODE == "wide-open-stall" and ARGS[:1] == ["once"]:
            listener.close()  # later connections are refused
            return


listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
threading.Thread(target=accept_loop, args=(listener,), daemon=True).start()
for line in sys.stdin:
    if line.strip() == "count":
        with lock:
            print(header_blocks, flush=True)
    elif line.strip() == "bodiless":
        with lock:
            print(most_bodiless, flush=True)
