import CNghttp2
import GRPCCMCompression
@_spi(Reactor) import GRPCCMReactor
@_spi(Transport) import GRPCCMTransport
import GRPCCMWire

#if canImport(Glibc)
import Glibc
#endif

/// One RPC of any kind, from start to its single completion: the driver of a `CallStateMachine`. It owns the deadline,
/// the attempts (each one stream), the backoff between them, the circuit breaker's permit, and both kinds of retry
/// (transparent and by policy); retry decisions live here and nowhere else. Reactor-thread only once started.
///
/// The request is either one message known up front (unary, server streaming: it can be replayed for retries) or
/// messages written while the call runs (client and bidirectional streaming, through `StreamBuffers`). The response
/// is either one message handed over with the status (unary, client streaming) or each message as it arrives, to
/// callbacks or to `StreamBuffers` for an async reader.
///
/// **Attempt identity.** Each attempt is one stream. An attempt that ends early (its own timeout, the deadline, a
/// cancel) resets its stream, which detaches this call from it: nothing that stream still delivers (late DATA, the
/// RST) reaches the call. A queue entry left behind is harmless: the router opens a stream only for a call that is
/// waiting for one (`open(on:)` checks), so no request goes out twice.
///
/// **User code never runs from here directly.** Stream events arrive inside nghttp2's processing; the completion,
/// stream callbacks and the end of an async stream are queued and run in the reactor's deferred phase
/// (`reactorRunDeferred`), after the call's bus events. A call that fails at once still completes on a later turn.
///
/// `@unchecked Sendable` (through `ReactorHandler`): created on the caller's thread, then touched only on the
/// reactor thread (the submission hands it over).
/// Its stored properties are `@exclusivity(unchecked)`: touched on the reactor thread only, and never while another
/// access to the same property is in progress (no callback re-enters a method that holds one). The runtime check
/// costs about 75 instructions per access and, across module boundaries, cannot be proven away by the optimizer.
package final class ClientCall: HTTP2StreamHandler, @unchecked Sendable {
    /// Where response messages go.
    package enum Delivery {
        /// Exactly one message, handed over with the status.
        case single
        /// Each message to callbacks, on the reactor thread, as it arrives.
        case callbacks(StreamingCallbacks)
        /// Each message into `buffers`, for a reader on another thread.
        case buffered
    }

    private enum TimerTag {
        static let deadline: UInt64 = 0
        static let retry: UInt64 = 1
        static let attempt: UInt64 = 2
    }

    /// `Delivery` without its payload: read on every call's paths, it costs no copy (a stored `Delivery` read from
    /// a `var` cost about 100 instructions a call in outlined copies).
    private enum DeliveryKind {
        case single, callbacks, buffered
    }

    /// What a callback reader (or an observer) has yet to hear, in order.
    private enum CallbackPart {
        case metadata(CallMetadata)
        case message([UInt8])
        /// A message kept compressed in the response's encoding (`keepCompressed`), inflated when delivered.
        case compressedMessage([UInt8], inflatedSize: Int)
        case writable
        /// For observers: an attempt ended (its number, status, whether another follows).
        case attempt(Int, CallStatus, willRetry: Bool)
    }

    package let environment: CallEnvironment
    package let path: String
    /// What every attempt's request headers say: the path, the metadata (interceptors that prepare asynchronously set
    /// it before the call begins) and the encoding. `open` sets an attempt's timeout and count in place and lends it
    /// to the transport `inout`: handed over by value, a head made per attempt (or copied from here) cost a retain
    /// and a release of the path and the metadata, about 100 instructions a call.
    @exclusivity(unchecked)
    private var requestHead: RequestHead
    /// The request metadata.
    package var metadata: CallMetadata { self.requestHead.metadata }
    /// The request message of a call whose request is one message (empty when the requests are streamed), already
    /// compressed when `requestEncoding` says so.
    private let request: [UInt8]
    /// How the request messages are compressed (`grpc-encoding`); streamed ones are compressed as they are written.
    private let requestEncoding: CallCompression
    /// Messages written while the call runs, and buffered responses; nil for unary and callback server streaming.
    package let buffers: StreamBuffers?
    /// How responses reach the caller (the callbacks themselves are in `callbacks`).
    private let delivery: DeliveryKind
    /// The `.callbacks` delivery's callbacks; let go of at the end (`letGoOfUserCode`), with `completion`,
    /// `onWritable` and the observers.
    @exclusivity(unchecked)
    private var callbacks: StreamingCallbacks?
    /// Requests or responses are a stream (not a unary call): its breaker outcome comes with the response headers.
    private let streams: Bool
    /// Absolute deadline on the monotonic clock in ns; 0 = none.
    package let deadline: UInt64
    private let maxReceiveMessageSize: Int
    package let waitForReady: Bool
    @exclusivity(unchecked)
    private var completion: (@Sendable (UnaryResponse) -> Void)?
    @exclusivity(unchecked)
    private var onWritable: (@Sendable () -> Void)?
    private let requestsStreamed: Bool
    /// Attempts made before this call by someone else's retry logic (GRPCCore's), for `grpc-previous-rpc-attempts`.
    @exclusivity(unchecked)
    package var previousAttemptsElsewhere = 0
    /// Set when the request is invalid (bad path, metadata, size): the call fails before anything is sent.
    @exclusivity(unchecked)
    package var invalid: CallStatus?
    /// Interceptors' observers, in interceptor order (set before the call is submitted, or when preparation ends).
    @exclusivity(unchecked)
    package var observers: [any CallObserver] = []
    /// This call is one attempt of a hedged call (gRFC A6), numbered from 1: its coordinator admits, counts and
    /// reports the call; this one neither asks the breaker, nor publishes the call's start and end, nor retries by
    /// policy. 0: an ordinary call.
    @exclusivity(unchecked)
    package var hedgeAttempt = 0
    /// A hedged attempt's coordinator, told when this attempt's response headers arrive: gRFC A6 commits the call to
    /// it then. Called at once, from inside nghttp2's processing: it may only record the commit (so that nothing
    /// launched later in the same turn, a hedge timer or another attempt's end, sends another attempt) and defer the
    /// rest.
    @exclusivity(unchecked)
    package var onResponseHeaders: (@Sendable () -> Void)?
    /// An interceptor is still preparing the call asynchronously: `start()` only arms the deadline, and
    /// `preparationFinished` begins it.
    @exclusivity(unchecked)
    package var preparing = false

    @exclusivity(unchecked)
    private var machine: CallStateMachine
    /// The current attempt's stream while it is open.
    @exclusivity(unchecked)
    private var stream: HTTP2StreamHandle?
    // The current attempt's response.
    @exclusivity(unchecked)
    private var head: ResponseHead
    @exclusivity(unchecked)
    private var deframer: MessageDeframer
    @exclusivity(unchecked)
    private var responseMessage: [UInt8]?
    /// How the current attempt's response messages are compressed (from its `grpc-encoding`, when offered).
    @exclusivity(unchecked)
    private var responseEncoding = CallCompression.identity
    /// A failure found while receiving (oversized, bad flag, headers too large); the attempt ends with it.
    @exclusivity(unchecked)
    private var localFailure: CallStatus?
    /// Bytes of the framed single request handed to nghttp2.
    @exclusivity(unchecked)
    private var sendOffset = 0
    /// The last attempt whose retry the server's pushback timed (0: none): the backoff counts from there.
    @exclusivity(unchecked)
    private var pushedBackAttempt = 0
    /// An attempt has been dispatched since the per-attempt state above was last reset.
    @exclusivity(unchecked)
    private var attemptStateUsed = false

    @exclusivity(unchecked)
    private var deadlineTimer: Reactor.TimerID = 0
    @exclusivity(unchecked)
    private var attemptTimer: Reactor.TimerID = 0
    @exclusivity(unchecked)
    private var retryTimer: Reactor.TimerID = 0
    /// Reactor clock when the call started (0: it never did: invalid, or refused before it began); for a call that an
    /// interceptor prepared, when that work was done (the breaker's duration runs from there).
    @exclusivity(unchecked)
    private var startedAt: UInt64 = 0
    /// Reactor clock when the bus heard of a call that an interceptor then prepared (0: none did): its reported
    /// duration, what the caller waited, runs from here, as a hedged call's does.
    @exclusivity(unchecked)
    private var announcedAt: UInt64 = 0
    @exclusivity(unchecked)
    private var permit: CallPermit?
    @exclusivity(unchecked)
    private var attemptsMade = 0
    @exclusivity(unchecked)
    private var adopted = false
    /// This side ended the call, not the server: the caller cancelled, or the channel closed. Such an end releases
    /// the breaker's slot and counts for nothing: a channel replaced with calls in flight must not open the breaker
    /// its successor inherits.
    @exclusivity(unchecked)
    package private(set) var endedLocally = false
    /// A call that watches rather than works (`watchHealth`'s Watch, which never ends of itself): a graceful close ends
    /// it as it begins, as it ends a waiting call, instead of waiting the whole grace period for it. Set before the
    /// call starts; loop thread only after.
    @exclusivity(unchecked)
    package var endsWhenClosing = false
    @exclusivity(unchecked)
    package private(set) var sentBytes = 0
    @exclusivity(unchecked)
    package private(set) var receivedBytes = 0

    /// The router's bookkeeping: the call sits in its wait queue.
    @exclusivity(unchecked)
    package var queued = false
    /// The router's registry of live calls (an intrusive list: no allocation per call).
    @exclusivity(unchecked)
    package var registryNext: ClientCall?
    /// Unmanaged: reading an `unowned(unsafe)` reference still retains it.
    @exclusivity(unchecked)
    package var registryPrevious: Unmanaged<ClientCall>?

    // Deferred delivery.
    @exclusivity(unchecked)
    private var parts: [CallbackPart] = []
    @exclusivity(unchecked)
    private var partsDelivering: [CallbackPart] = []
    /// Bytes of inflated messages in `parts`.
    @exclusivity(unchecked)
    private var partsInflatedBytes = 0
    @exclusivity(unchecked)
    private var result: UnaryResponse?
    @exclusivity(unchecked)
    private var deliveryScheduled = false
    @exclusivity(unchecked)
    private var completed = false
    /// A transparent retry waits for this turn's deferred phase (`attemptEnded`).
    @exclusivity(unchecked)
    private var transparentRetryPending = false

    /// - Parameters:
    ///   - request: The one request message, or nil when `buffers` carries a request stream.
    package init(
        environment: CallEnvironment, path: String, metadata: CallMetadata, request: [UInt8]?, deadline: UInt64,
        maxReceiveMessageSize: Int, waitForReady: Bool, delivery: consuming Delivery = .single, buffers: StreamBuffers? = nil,
        requestEncoding: CallCompression = .identity, onWritable: (@Sendable () -> Void)? = nil,
        previousAttemptsElsewhere: Int = 0, invalid: CallStatus? = nil, observers: [any CallObserver] = [],
        preparing: Bool = false, completion: @escaping @Sendable (UnaryResponse) -> Void
    ) {
        // These four are parameters rather than set by the channel afterwards: a store from another module into a
        // class's property pays a dynamic exclusivity check (four per call), `@exclusivity(unchecked)` or not.
        self.previousAttemptsElsewhere = previousAttemptsElsewhere
        self.invalid = invalid
        self.observers = observers
        self.preparing = preparing
        self.requestEncoding = requestEncoding
        self.loopReactor = Unmanaged.passUnretained(environment.reactor)
        self.head = ResponseHead(maxHeaderListSize: environment.maxHeaderListSize)
        self.requestHead = RequestHead(
            path: path, metadata: metadata, timeoutNanoseconds: nil, previousRPCAttempts: 0, encoding: requestEncoding)
        self.path = path
        let requestsStreamed = request == nil
        self.requestsStreamed = requestsStreamed
        self.machine = CallStateMachine(requestsStreamed: requestsStreamed)
        self.buffers = buffers
        if case .single = delivery { self.streams = requestsStreamed } else { self.streams = true }
        switch consume delivery {
        case .single: self.delivery = .single
        case .buffered: self.delivery = .buffered
        case .callbacks(let callbacks):
            self.delivery = .callbacks
            self.callbacks = callbacks
        }
        self.deadline = deadline
        self.maxReceiveMessageSize = maxReceiveMessageSize
        self.waitForReady = waitForReady
        self.completion = completion
        self.onWritable = onWritable
        self.deframer = MessageDeframer(maxMessageSize: maxReceiveMessageSize)
        // Each the last use of its argument, so the argument moves in: read again after its store, each was retained
        // once more and released at the end.
        self.request = request ?? []
        self.environment = environment
        super.init()
        if let buffers {
            buffers.waker.call = self
            buffers.waker.reactor = self.reactor
        }
    }

    package var isFinished: Bool { self.machine.isFinished }

    /// The status it ended with, once its completion is on its way.
    package var finalStatus: CallStatus? { self.result?.status }
    /// Waiting for a stream (routed, not yet open).
    package var isWaitingForStream: Bool { self.machine.isWaiting }
    /// Waiting for its next attempt.
    package var isBackingOff: Bool { self.machine.isBackingOff }
    /// The attempt in progress (1 = the first); 0 before the first.
    package var attempt: Int { self.machine.attempt }

    private var reactor: Reactor { self.environment.reactor }
    /// The same reactor, read unretained where every call passes (see `Reactor`): `environment` holds it for as
    /// long as this call exists, and a read through it cost a protective retain and release.
    private let loopReactor: Unmanaged<Reactor>

    /// Calls `body` with the reactor unretained (see `loopReactor`): how the paths every call takes reach it (its
    /// start, its timers, its delivery), where `self.reactor` cost a protective retain and release each time.
    @inline(__always)
    private func withReactor<Result>(_ body: (Reactor) -> Result) -> Result {
        self.loopReactor._withUnsafeGuaranteedRef(body)
    }

    /// Arms the call's deadline timer (once; the call has a deadline).
    private func armDeadline() {
        self.deadlineTimer = self.withReactor { $0.scheduleTimer(at: self.deadline, handler: self, tag: TimerTag.deadline) }
    }

    /// Calls `body` with the environment as an argument. Reached as `self.environment.router.route(self)`, every call
    /// into the router, a policy or the bus had a protective retain and release around it (about 40 instructions):
    /// the optimizer keeps an argument alive for the body without one, but not a `let` read through `self`.
    @inline(__always)
    private func withEnvironment<Result>(_ body: (CallEnvironment) -> Result) -> Result {
        body(self.environment)
    }

    // MARK: starting

    /// Submitted from the caller's thread: start here.
    package override func reactorRunSubmitted() {
        self.start()
    }

    /// Starts the call on the reactor thread: at once, or, while an interceptor prepares it, once that is done.
    package func start() {
        if self.preparing {
            self.preparing = false
            guard self.machine.prepare() else { return }
            // Counted from here: a call that its interceptors fail, or that ends while they work, is a call too.
            self.withEnvironment { self.announce($0) }
            // Adopted now, so that closing the channel or stopping the loop ends it like any other call; the
            // deadline runs while it waits.
            self.adopted = true
            self.environment.router.adopt(self)
            // A channel that closed (or a loop that began stopping) before this start ran has ended its calls
            // already: this one ends now too, not once the interceptors' work is done (it may never be).
            if let refusal = self.withEnvironment({ $0.closingRefusal }) {
                self.endByClosing(refusal)
                return
            }
            if self.deadline != 0 {
                self.armDeadline()
            }
            return
        }
        self.begin()
    }

    /// The interceptors finished preparing (loop thread): the call begins with `metadata`, or fails with `failure`.
    /// Nothing happens if it ended meanwhile (cancelled, its deadline, a closed channel).
    package func preparationFinished(metadata: CallMetadata, observers: [any CallObserver], failure: CallStatus?) {
        guard self.machine.isPreparing else {
            // It ended while they worked: the observers that joined since hear of the end all the same, in the
            // deferred phase as every observer does (this runs in the turn's submitted work).
            if let result = self.result {
                self.withReactor { reactor in
                    _ = reactor.executeDeferred { for observer in observers.reversed() { observer.callFinished(result) } }
                }
            }
            return
        }
        self.requestHead.metadata = metadata
        self.observers.append(contentsOf: observers)
        if let failure { self.invalid = failure }
        self.begin()
    }

    private func begin() {
        // Ended before its submitted start ran (cancelled on the loop's thread meanwhile): neither admitted, which
        // would take a breaker permit that nothing gives back, nor reported as started.
        guard !self.machine.isFinished else { return }
        let refusal = self.withEnvironment { environment in self.refusalOrAdmission(environment) }
        switch self.machine.start(refusal: refusal) {
        case .none:
            return
        case .finish(let status):
            // Refused before any attempt (invalid, a closing channel, a stopping loop, the breaker): it reports
            // itself all the same, with 0 attempts, and leaves the router if it waited there. The breaker's refusal
            // and an invalid request say "do not retry"; a closed channel's does not (a layer above may dial again).
            let final = self.invalid != nil || status == Self.breakerOpen
            self.finish(UnaryResponse(status: status, trailingMetadata: final ? Self.notAttemptedTrailers : [:]))
        case .route:
            if !self.adopted {
                self.adopted = true
                self.withEnvironment { $0.router.adopt(self) }
            }
            if self.deadline != 0 && self.deadlineTimer == 0 {
                self.armDeadline()
            }
            self.dispatchAttempt()
        }
    }

    /// The trailers of a call the breaker refused, or an invalid one: `grpc-retry-pushback-ms: -1`, a server's way
    /// of saying "do not retry" (gRFC A6). A retrying layer above this client (GRPCCore's, through the grpc-swift-2
    /// transport) would otherwise retry an open breaker's refusal, each a little later, instead of failing fast, as
    /// this client's own retry handler does. One shared value: a refusal allocates nothing for it.
    static let notAttemptedTrailers: CallMetadata = ["grpc-retry-pushback-ms": "-1"]

    /// How the circuit breaker refuses a call.
    static let breakerOpen = CallStatus(code: .unavailable, message: "circuit breaker is open")

    /// Why the call may not begin (invalid, a closing channel, a stopping loop, the breaker), or nil: it may, and the
    /// breaker's permit is taken.
    private func refusalOrAdmission(_ environment: CallEnvironment) -> CallStatus? {
        // Every call the application made is counted (metrics, logs), including those refused here, as a client
        // interceptor outermost in grpc-go counts them.
        let now: UInt64
        if self.startedAt == 0 {
            self.announce(environment)
            now = self.startedAt
        } else {
            // Announced when its interceptors began. The breaker's duration runs from now: it must not count a slow
            // token refresh as a slow server. The bus's still runs from the announcement.
            now = Reactor.clock()
            self.announcedAt = self.startedAt
            self.startedAt = now
        }
        if let invalid = self.invalid { return invalid }
        // Written out, not `CallEnvironment.closingRefusal`: through the helper every call paid a dynamic exclusivity
        // check and a retain (about 150 instructions at the gate).
        if environment.router.isClosing { return environment.router.closingStatus }
        if self.withReactor({ $0.isStopping }) { return CallEnvironment.loopStopping }
        guard self.hedgeAttempt == 0 else { return nil }
        // Called through the optional in place: bound to a local first, the admission was retained for the call.
        guard environment.policies.admission != nil else { return nil }
        self.permit = environment.policies.admission?.admit(service: environment.service, path: self.path, now: now)
        // Refused without touching the network; reported as a call with no attempt.
        return self.permit == nil ? Self.breakerOpen : nil
    }

    /// The call has started: its duration runs from now, and the bus hears of it (unless it is a hedged call's
    /// attempt, which its coordinator reports).
    @inline(__always)
    private func announce(_ environment: CallEnvironment) {
        self.startedAt = Reactor.clock()
        guard self.hedgeAttempt == 0 else { return }
        environment.bus.publishCallEvent(.callStarted(service: environment.service, path: self.path, attempt: 1))
    }

    /// Sends the current attempt (the first, a retry after its backoff, or a transparent retry).
    private func dispatchAttempt() {
        // The first attempt finds the state as `init` made it.
        if self.attemptStateUsed { self.resetAttemptState() }
        self.attemptStateUsed = true
        self.attemptsMade = max(self.attemptsMade, self.machine.attempt)
        // The per-attempt timeout is there to retry a slow attempt: an attempt nothing may follow (streamed requests,
        // a hedged call's attempt, which its coordinator replaces) would only be ended early by it.
        if !self.requestsStreamed && self.hedgeAttempt == 0,
            let timeout = self.withEnvironment({ $0.policies.retry?.perAttemptTimeout(path: self.path) })
        {
            let at = Reactor.clock() &+ UInt64(max(timeout.nanoseconds, 0))
            if self.deadline == 0 || at < self.deadline {
                self.attemptTimer = self.withReactor { $0.scheduleTimer(at: at, handler: self, tag: TimerTag.attempt) }
            }
        }
        self.withEnvironment { $0.router.route(self) }
    }

    private func resetAttemptState() {
        self.attemptStateUsed = false
        self.head = ResponseHead(maxHeaderListSize: self.environment.maxHeaderListSize)
        self.responseMessage = nil
        self.responseEncoding = .identity
        self.localFailure = nil
        self.sendOffset = 0
        self.deframer = MessageDeframer(maxMessageSize: self.maxReceiveMessageSize)
    }

    // MARK: from the router

    /// What `open(on:)` came to.
    package enum OpenOutcome {
        /// The call no longer needs a stream (it is open, ended, or between attempts): drop it.
        case notWaiting
        /// A stream is open (or the call ended trying): done with it.
        case done
        /// That connection takes no stream now: try another, or keep it waiting.
        case tryElsewhere
    }

    /// Opens a stream on `transport` for the waiting attempt.
    package func open(on transport: any HTTP2Transport) -> OpenOutcome {
        guard self.machine.isWaiting else { return .notWaiting }
        var timeout: Int64? = nil
        if self.deadline != 0 {
            let remaining = Int64(bitPattern: self.deadline &- Reactor.clock())
            if remaining <= 0 {
                self.end(CallStatus(code: .deadlineExceeded, message: "deadline exceeded before the call was sent"))
                return .done
            }
            timeout = remaining
        }
        self.requestHead.timeoutNanoseconds = timeout
        self.requestHead.previousRPCAttempts = max(self.machine.attempt - 1, 0) + self.previousAttemptsElsewhere
        switch transport.openStream(&self.requestHead, handler: self) {
        case .opened(let handle):
            self.stream = handle
            self.machine.streamOpened()
            self.sentBytes += self.request.count
            return .done
        case .tryElsewhere:
            return .tryElsewhere
        case .failed(let status):
            self.attemptEnded(UnaryResponse(status: status), unprocessed: false)
            return .done
        }
    }

    /// The router could not route the attempt (every connection failed, the queue is full, the channel closed).
    package func routeFailed(_ status: CallStatus) {
        guard self.machine.isWaiting else { return }
        self.attemptEnded(UnaryResponse(status: status), unprocessed: false)
    }

    /// The router refused the attempt by a rule of its own (its queue of waiting calls is full): the call ends now
    /// with `status`, not retried, and as an end this side caused, counted by neither the breaker nor the retry
    /// throttle (a backlog in the client says nothing of the server).
    package func routeRefused(_ status: CallStatus) {
        guard self.machine.isWaiting else { return }
        self.endedLocally = true
        self.attemptEnded(UnaryResponse(status: status), unprocessed: false, retryable: false, serverOutcome: false)
    }

    /// The channel began to close gracefully: a call waiting for a stream or between attempts ends now, an open one
    /// runs to its end and is not retried.
    package func channelClosing(_ status: CallStatus) {
        if self.endsWhenClosing {
            self.endByClosing(status)
            return
        }
        let action = self.machine.closing(status)
        if case .finish = action { self.endedLocally = true }
        self.perform(action)
    }

    /// The channel closed at once (not gracefully): the call ends now with `status`, which the closing caused and the
    /// server did not answer.
    package func endByClosing(_ status: CallStatus) {
        if !self.machine.isFinished { self.endedLocally = true }
        self.end(status)
    }

    // MARK: ending

    package override func reactorTimerFired(tag: UInt64) {
        switch tag {
        case TimerTag.retry:
            self.retryTimer = 0
            switch self.machine.backoffElapsed() {
            case .none: return
            case .route: self.dispatchAttempt()
            case .finish(let status): self.finish(UnaryResponse(status: status))
            }
        case TimerTag.attempt:
            self.attemptTimer = 0
            guard self.machine.isOpen || self.machine.isWaiting else { return }
            self.abandonAttempt()
            self.attemptEnded(
                UnaryResponse(status: CallStatus(code: .deadlineExceeded, message: "attempt timed out"),
                    initialMetadata: self.head.initialMetadata),
                unprocessed: false)
        default:
            // The call's deadline: final, whatever attempt is running, waiting or backing off.
            self.deadlineTimer = 0
            self.end(CallStatus(code: .deadlineExceeded, message: "deadline exceeded"))
        }
    }

    /// Ends the call with `status` wherever it is (deadline, cancel, a channel closed for good).
    package func end(_ status: CallStatus) {
        self.perform(self.machine.ended(status))
    }

    /// Cancels from any thread: inline on the reactor thread, else handed to it. A streaming call that is known to
    /// have ended costs no hand-off at all.
    package func cancelFromAnyThread(_ status: CallStatus = CallStatus(code: .cancelled, message: "cancelled by the client")) {
        self.failFromAnyThread(status, byClient: true)
    }

    /// Ends the call with `status` from any thread.
    package func failFromAnyThread(_ status: CallStatus, byClient: Bool = false) {
        if self.buffers?.isFinished == true { return }
        let reactor = self.reactor
        if reactor.inReactorThread {
            if byClient && !self.machine.isFinished { self.endedLocally = true }
            self.end(status)
        } else {
            reactor.execute {
                if byClient && !self.machine.isFinished { self.endedLocally = true }
                self.end(status)
            }
        }
    }

    private func perform(_ action: CallStateMachine.OnEnded) {
        guard case .finish(let status, let abandoning) = action else { return }
        switch abandoning {
        case .nothing:
            break
        case .stream, .queue:
            self.abandonAttempt()
            // The abandoned attempt ended too: the bus and observers hear of it, as of any other. The throttle does
            // not: this side ended it (the caller's deadline or cancel, the channel closing), so it says nothing of
            // the server.
            self.observeAttempt(self.attemptsMade, status, willRetry: false)
            self.withEnvironment { environment in self.reportAttempt(status, environment, serverOutcome: false) }
        case .backoff:
            if self.retryTimer != 0 {
                self.withReactor { $0.cancelTimer(self.retryTimer) }
                self.retryTimer = 0
            }
        }
        self.finish(UnaryResponse(status: status, initialMetadata: self.head.initialMetadata))
    }

    /// Lets go of the current attempt: resets its stream (which detaches us from it) or leaves the queue.
    private func abandonAttempt() {
        if let stream = self.stream {
            self.stream = nil
            stream.reset(errorCode: NGHTTP2_CANCEL.rawValue)
        }
        if self.queued { self.withEnvironment { $0.router.withdraw(self) } }
    }

    /// Queues an attempt's end for the observers (nothing to do without any).
    private func observeAttempt(_ attempt: Int, _ status: CallStatus, willRetry: Bool) {
        guard !self.observers.isEmpty else { return }
        self.parts.append(.attempt(attempt, status, willRetry: willRetry))
        self.scheduleDelivery()
    }


    /// - Parameter serverOutcome: The server's answer (or the network's), which the retry throttle counts; false for an
    ///   attempt this side abandoned. A failure while the channel closes is the closing's, not the server's, either.
    private func reportAttempt(
        _ status: CallStatus, trailers: borrowing CallMetadata = CallMetadata(), _ environment: CallEnvironment,
        serverOutcome: Bool = true
    ) {
        // A hedged attempt's outcome is its coordinator's to count: which codes are failures is the hedging policy's.
        if serverOutcome && self.hedgeAttempt == 0 && (status.isOK || !environment.router.isClosing) {
            environment.policies.retry?.attemptEnded(
                service: environment.service, path: self.path, status: status, trailers: trailers)
        }
        environment.bus.publishCallEvent(
            .attemptFinished(
                service: environment.service, path: self.path, status: status,
                attempt: self.hedgeAttempt == 0 ? self.attemptsMade : self.hedgeAttempt))
    }

    /// Where every attempt ends: a transparent retry, a retry by policy after a backoff, or the call's end.
    private func attemptEnded(
        _ response: consuming UnaryResponse, unprocessed: Bool, retryable: Bool = true, serverOutcome: Bool = true
    ) {
        if self.attemptTimer != 0 {
            self.withReactor { $0.cancelTimer(self.attemptTimer) }
            self.attemptTimer = 0
        }
        self.stream = nil
        let environment = self.environment
        // A second refusal of the same attempt is the policy's to judge, like any failure (gRFC A6): only the first
        // is retried transparently.
        let transparent = unprocessed && self.machine.mayRetryTransparently && !environment.router.isClosing
            && !self.withReactor({ $0.isStopping })
        var delay: Duration? = nil
        if !transparent {
            self.withEnvironment { environment in
                self.reportAttempt(
                    response.status, trailers: response.trailingMetadata, environment, serverOutcome: serverOutcome)
            }
            if retryable, self.hedgeAttempt == 0, self.machine.mayRetryByPolicy, !response.status.isOK,
                let retry = environment.policies.retry
            {
                let attempt = self.machine.attempt
                if let decision = retry.retryDelay(
                    service: environment.service, path: self.path, status: response.status,
                    trailers: response.trailingMetadata, attempt: attempt, backoffStep: attempt - self.pushedBackAttempt,
                    deadline: self.deadline, now: Reactor.clock())
                {
                    delay = decision.delay
                    if decision.pushedBack { self.pushedBackAttempt = attempt }
                }
            }
        }
        let attempt = self.machine.attempt
        // The machine is told what was decided here: refused while the loop stops, the attempt was reported as ended
        // above, and a transparent retry would only be refused by the stopping loop and reported a second time.
        let outcome = self.machine.attemptEnded(status: response.status, unprocessed: transparent, retryDelay: delay)
        switch outcome {
        case .none: break
        case .retryTransparently: self.observeAttempt(attempt, response.status, willRetry: true)
        case .retryAfter: self.observeAttempt(attempt, response.status, willRetry: true)
        case .finish: self.observeAttempt(attempt, response.status, willRetry: false)
        }
        switch outcome {
        case .none:
            return
        case .retryTransparently:
            // Not from inside the read that refused the stream: the rest of it (a GOAWAY after the RST_STREAM) may
            // take the connection away, and a retry opened on it first was refused by nghttp2 too, using up the one
            // transparent retry. At the end of this turn the pool knows what the read told it.
            self.transparentRetryPending = true
            self.scheduleDelivery()
        case .retryAfter(let delay):
            environment.bus.publish(
                .retryScheduled(
                    service: environment.service, path: self.path, attempt: self.machine.attempt + 1, delay: delay,
                    status: response.status))
            self.resetAttemptState()
            let retryAt = Reactor.clock() &+ UInt64(max(delay.nanoseconds, 0))
            self.retryTimer = self.withReactor { $0.scheduleTimer(at: retryAt, handler: self, tag: TimerTag.retry) }
        case .finish:
            self.finish(response)
        }
    }

    /// Whether `result` is set, read in place (comparing the optional with nil copied the response).
    private var hasResult: Bool {
        if case .some = self.result { return true }
        return false
    }

    /// A call that streams (either way) tells the breaker its outcome when the server answers with headers, not
    /// when it ends: it may live for hours (a watch), and a half-open probe held that long would keep every other
    /// call of its method refused. Headers say the server took the call: a success (or a slow call, by the time they
    /// took). A unary call keeps its permit to the end, where its status is the outcome.
    private func settleStreamPermit() {
        guard let permit = self.permit else { return }
        self.permit = nil  // spent: the call's end tells the breaker nothing more
        self.withEnvironment { environment in
            let now = Reactor.clock()
            environment.policies.admission?.callEnded(
                permit, service: environment.service, path: self.path, status: .ok, duration: self.elapsed(until: now),
                now: now, endedLocally: false)
        }
    }

    /// Time since the call started, at `now`.
    @inline(__always)
    private func elapsed(until now: UInt64) -> Duration {
        Duration.nanoseconds(Int64(bitPattern: now &- self.startedAt))
    }

    /// The call's one end: bookkeeping, the breaker, the bus, then the completion (deferred).
    private func finish(_ response: consuming UnaryResponse) {
        for timer in [self.deadlineTimer, self.attemptTimer, self.retryTimer] where timer != 0 {
            self.withReactor { $0.cancelTimer(timer) }
        }
        self.deadlineTimer = 0
        self.attemptTimer = 0
        self.retryTimer = 0
        self.withEnvironment { environment in self.leave(environment, with: response) }
        self.complete(response)
    }

    /// The call's end told to everyone but the user: the router lets it go, the breaker and the bus hear of it.
    private func leave(_ environment: CallEnvironment, with response: borrowing UnaryResponse) {
        if self.queued { environment.router.withdraw(self) }
        if self.adopted {
            self.adopted = false
            environment.router.release(self)
        }
        let now = Reactor.clock()
        let duration = self.elapsed(until: now)
        if let permit = self.permit {
            // Ended by this side, not answered by the server: the caller's cancel, or the channel closing (its
            // status is the closing's own). Such ends release the breaker's slot and count for nothing: a channel
            // replaced with calls in flight must not open the breaker its successor inherits. The permit is not
            // cleared here: nothing reads it after the end, and the store cost every call measurably at the gate.
            environment.policies.admission?.callEnded(
                permit, service: environment.service, path: self.path, status: response.status, duration: duration,
                now: now, endedLocally: self.endedLocally)
        }
        if self.startedAt != 0 && self.hedgeAttempt == 0 {
            let waited = self.announcedAt == 0 ? duration : Duration.nanoseconds(Int64(bitPattern: now &- self.announcedAt))
            environment.bus.publishCallEvent(
                .callFinished(
                    service: environment.service, path: self.path, status: response.status, duration: waited,
                    attempts: self.attemptsMade, sentBytes: self.sentBytes, receivedBytes: self.receivedBytes))
        }
    }

    /// Queues the completion for the deferred phase.
    /// `consuming` down from `attemptEnded`: the response is moved into `result`, not copied (a retain per part).
    private func complete(_ response: consuming UnaryResponse) {
        guard !self.hasResult && !self.completed else { return }
        self.result = consume response
        if let buffers = self.buffers { buffers.callEnded(StreamResult(self.result!)) }
        if self.withReactor({ $0.isStopped }) {
            self.completeWithoutReactor()
            return
        }
        self.scheduleDelivery()
    }

    // MARK: delivery (the deferred phase: user code runs here)

    private func scheduleDelivery() {
        if !self.deliveryScheduled {
            self.deliveryScheduled = true
            self.withReactor { $0.enqueueDeferred(self) }
        }
    }

    package override func reactorRunDeferred() {
        self.deliveryScheduled = false
        if self.transparentRetryPending {
            self.transparentRetryPending = false
            // Unless something ended the call meanwhile (its deadline, a cancel, a closing channel).
            if !self.hasResult && !self.completed { self.dispatchAttempt() }
        }
        // What was there when this run began: anything a callback causes (its own cancel, say) comes next turn. (A
        // transparent retry dispatched just above that failed at once ends the call in this run: `ending` is read
        // after it.)
        let ending = self.hasResult
        if !self.parts.isEmpty {
            swap(&self.parts, &self.partsDelivering)
            self.partsInflatedBytes = 0
            for part in self.partsDelivering {
                // A callback that ended the call (a cancel) stops the rest of what was received.
                if !ending && self.hasResult { break }
                switch part {
                case .metadata(let metadata):
                    self.callbacks?.onInitialMetadata(metadata)
                case .message(let message):
                    self.callbacks?.onMessage(message)
                case .compressedMessage(let message, let inflatedSize):
                    // Checked when it arrived, so only zlib failing to start can refuse it now: the call ends.
                    do throws(MessageDecompressor.Failure) {
                        let inflated = try self.reactor.shared { MessageDecompressor() }.decompress(
                            message, with: self.responseEncoding, limit: inflatedSize)
                        self.callbacks?.onMessage(inflated)
                    } catch {
                        self.end(CallStatus(code: .internal, message: "response message could not be inflated: \(error)"))
                    }
                case .writable:
                    self.onWritable?()
                case .attempt(let attempt, let status, let willRetry):
                    for observer in self.observers {
                        observer.attemptFinished(attempt: attempt, status: status, willRetry: willRetry)
                    }
                }
            }
            self.partsDelivering.removeAll(keepingCapacity: true)
        }
        if ending, !self.completed {
            self.completed = true
            // This call's events first, published after it was queued when its messages came in the same read.
            self.environment.bus.dispatchPendingEvents()
            // Lent to the end's delivery, then put back (a later `preparationFinished` reads it): moved, not copied,
            // and `completed` keeps `complete` from taking another meanwhile.
            var lent: UnaryResponse? = nil
            swap(&lent, &self.result)
            Self.deliverEnd(of: self, &lent)
            swap(&lent, &self.result)
        }
    }

    /// The observers, then the buffers' readers, then the completion hear how `call` ended. The response comes
    /// `inout` so that it is lent, never copied.
    private static func deliverEnd(of call: ClientCall, _ response: inout UnaryResponse?) {
        // Attempts not yet told (the call ended in the turn they did) come before the end. Both lists are usually
        // empty, and asking first spares a retain and a release of the empty storage each.
        if !call.parts.isEmpty {
            for part in call.parts {
                guard case .attempt(let attempt, let status, let willRetry) = part else { continue }
                for observer in call.observers {
                    observer.attemptFinished(attempt: attempt, status: status, willRetry: willRetry)
                }
            }
            call.parts.removeAll()
        }
        if !call.observers.isEmpty {
            for observer in call.observers.reversed() { observer.callFinished(response!) }
        }
        call.buffers?.finish(StreamResult(response!))
        call.completion?(response!)
        call.letGoOfUserCode()
    }

    /// Called once the end was delivered: nothing of the user's is called again, and holding it would keep alive
    /// whatever it captured. A caller that keeps its `StreamingCall` (or `CallHandle`) in an object its callbacks
    /// capture would otherwise never free either.
    private func letGoOfUserCode() {
        self.completion = nil
        if self.streams {
            self.callbacks = nil
            self.onWritable = nil
        }
        if !self.observers.isEmpty { self.observers = [] }
    }

    /// The reactor has stopped for good, so no deferred phase will come: the completion runs on a thread of its
    /// own, never inside the call that started it.
    private func completeWithoutReactor() {
        guard let response = self.result, !self.completed else { return }
        self.completed = true
        let buffers = self.buffers
        let completion = self.completion
        let observers = self.observers
        self.letGoOfUserCode()
        spawnDetachedThread { [response] in
            for observer in observers.reversed() { observer.callFinished(response) }
            buffers?.finish(StreamResult(response))
            completion?(response)
        }
    }

    /// The reactor refused the call (it has stopped): it ends without one.
    package func finishWithoutReactor(_ status: CallStatus) {
        self.machine = CallStateMachine(requestsStreamed: self.requestsStreamed)
        _ = self.machine.ended(status)
        self.result = UnaryResponse(status: status)
        // Writes are refused from now, not accepted until the end's thread runs and then dropped.
        if let buffers = self.buffers { buffers.callEnded(StreamResult(self.result!)) }
        self.completeWithoutReactor()
    }

    // MARK: streaming

    /// Writes or reads happened on another thread (reactor thread, through `StreamWaker`).
    func streamWake() {
        guard let buffers = self.buffers else { return }
        let work = buffers.takeWakeWork()
        guard let stream = self.stream else { return }
        if work.resumeSending && self.requestsStreamed { stream.resume() }
        if work.consume > 0 { stream.consume(work.consume) }
    }

    /// The send buffer drained below its limit after a callback writer was told it was full.
    func notifyWritable() {
        guard !self.machine.isFinished, self.onWritable != nil else { return }
        self.parts.append(.writable)
        self.scheduleDelivery()
    }

    // MARK: HTTP2StreamHandler (inside nghttp2's processing: record, never call out)

    /// The whole unary request, END_STREAM included, has gone to nghttp2: read (or written) within a `mem_send`, which
    /// also sends the frame that carries it, so our half of the stream is closed, or about to be within that flush.
    /// Asked before `isLocallyClosed`, which goes through the handle and the connection to a stream lookup in nghttp2
    /// (about 100 instructions a call).
    private var requestHandedOver: Bool {
        !self.requestsStreamed && self.sendOffset == self.request.count + 5
    }

    package override func streamReadRequest(
        into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool
    ) -> RequestBodyRead {
        if self.requestsStreamed { return self.readStreamedRequest(into: buffer, length: length, eof: &eof) }
        let left = self.request.count + 5 - self.sendOffset
        if min(left, length) >= RequestBodyRead.noCopyMinimum {
            eof = length >= left
            return .later(min(left, length))
        }
        let written = MessageFramer.copyFramed(
            self.request, compressed: self.requestEncoding != .identity, offset: &self.sendOffset, into: buffer,
            capacity: length)
        eof = self.sendOffset == self.request.count + 5
        return .copied(written)
    }

    /// Kept out of `streamReadRequest`: inlined there, the stream buffers' code made every unary call look up a
    /// generic type's metadata on entry (about 30 instructions), whichever path it took.
    @inline(never)
    private func readStreamedRequest(
        into buffer: UnsafeMutablePointer<UInt8>, length: Int, eof: inout Bool
    ) -> RequestBodyRead {
        self.buffers!.read(into: buffer, length: length, eof: &eof, messageBytes: &self.sentBytes)
    }

    package override func streamWriteRequest(length: Int, to sink: (UnsafeRawBufferPointer) -> Void) -> Bool {
        if self.requestsStreamed {
            return self.buffers!.write(length: length, to: sink, messageBytes: &self.sentBytes)
        }
        guard self.request.count + 5 - self.sendOffset >= length else { return false }
        _ = MessageFramer.emitFramed(
            self.request, compressed: self.requestEncoding != .identity, offset: &self.sendOffset, capacity: length,
            to: sink)
        return true
    }

    package override func streamHeader(name: UnsafeBufferPointer<UInt8>, value: UnsafeBufferPointer<UInt8>) -> Bool {
        if self.withEnvironment({ self.head.header(name: name, value: value, names: $0.metadataNames) }) { return true }
        if let reason = self.head.malformation {
            // Reset here (PROTOCOL_ERROR, RFC 9113 §8.1.1): the rest of the block then reaches nobody.
            self.endMalformed(reason)
            return true
        }
        self.localFailure = CallStatus(
            code: .resourceExhausted,
            message: "response header block exceeds maxHeaderListSize (\(self.head.maxHeaderListSize) bytes)")
        return false
    }

    /// The response broke HTTP/2's rules: the stream is reset with PROTOCOL_ERROR and the attempt ends INTERNAL.
    private func endMalformed(_ reason: String) {
        self.failAttempt(
            CallStatus(code: .internal, message: "malformed response from the server: \(reason)"),
            resetWith: NGHTTP2_PROTOCOL_ERROR.rawValue)
    }

    /// Ends the attempt from inside nghttp2's processing with `status`, resetting its stream with `errorCode`.
    private func failAttempt(_ status: CallStatus, resetWith errorCode: UInt32) {
        guard let stream = self.stream else { return }
        self.localFailure = status
        self.stream = nil
        stream.reset(errorCode: errorCode)
        self.attemptEnded(UnaryResponse(status: status, initialMetadata: self.head.initialMetadata), unprocessed: false)
    }

    package override func streamHeadersEnded(endStream: Bool) {
        switch self.head.endBlock(endStream: endStream) {
        case .malformed:
            self.endMalformed(self.head.malformation ?? "")
        case .informational:
            return
        case .notGRPC:
            // An HTTP answer, not gRPC (a proxy's 503 page): its body is not deframed, the stream is cancelled.
            self.failAttempt(
                self.head.notGRPCResponse() ?? CallStatus(code: .unknown, message: "not a gRPC response"),
                resetWith: NGHTTP2_CANCEL.rawValue)
        case .headers:
            self.machine.headersReceived()
            // Committed: no retry can follow, so the attempt's timeout would only cut a response that is coming.
            if self.attemptTimer != 0 {
                self.withReactor { $0.cancelTimer(self.attemptTimer) }
                self.attemptTimer = 0
            }
            if self.streams { self.settleStreamPermit() }
            if let committed = self.onResponseHeaders {
                self.onResponseHeaders = nil
                committed()
            }
            if let name = self.head.grpcEncoding, let encoding = CallCompression(name: name), encoding != .identity {
                // An encoding this client implements: compressed messages may follow, whether or not it was offered
                // (grpc-go's rule: grpc core servers compress with their default whatever the client offers). Any
                // other name leaves compressed messages refused with INTERNAL.
                self.responseEncoding = encoding
                self.deframer.compressionAllowed = true
            }
            switch self.delivery {
            case .single: break
            case .callbacks:
                self.parts.append(.metadata(self.head.initialMetadata))
                self.scheduleDelivery()
            case .buffered: self.buffers!.deliverMetadata(self.head.initialMetadata)
            }
        case .trailers, .trailersOnly:
            guard endStream, let stream = self.stream, !self.requestHandedOver, !stream.isLocallyClosed else { return }
            // The server ended the call while requests are still open: the status is final now. Our half of the
            // stream is reset (NO_ERROR) so that nghttp2 releases it (gRPC over HTTP/2: the server may end first).
            let response = self.finalResponse(errorCode: 0)
            self.stream = nil
            stream.reset(errorCode: NGHTTP2_NO_ERROR.rawValue)
            // A trailers-only answer commits nothing (gRFC A6): the policy may retry it, the request being the
            // caller's still (a unary request is kept whole; a streamed one is never retried by policy). After
            // response headers the call is committed, and the state machine says so.
            self.attemptEnded(response, unprocessed: false, retryable: self.head.trailersOnly)
        }
    }

    package override func streamData(_ bytes: UnsafeRawBufferPointer) -> Int {
        guard self.localFailure == nil, self.hasStream else { return 0 }
        guard self.head.receivedResponseHeaders else {
            // After a 1xx only, or nothing: nghttp2 (without its HTTP checks) lets such DATA through.
            self.endMalformed("DATA before the response headers")
            return 0
        }
        var failure: CallStatus? = nil
        do throws(MessageDeframer.Failure) {
            try self.deframer.process(bytes) { received, compressed in
                guard failure == nil else { return }
                self.receivedBytes += received.count  // message bytes as they came, as `sentBytes` counts them
                if case .single = self.delivery, self.responseMessage != nil {
                    // A second message where one is due: the call fails now (and its stream is cancelled), as
                    // grpc-go's does. Read on to the end, a server could stream into it for ever.
                    failure = CallStatus(code: .internal, message: "expected one response message, received more")
                    return
                }
                var message = received
                if compressed {
                    do throws(MessageDecompressor.Failure) {
                        let decompressor = self.reactor.shared { MessageDecompressor() }
                        if let size = try self.keepCompressed(received, checkedBy: decompressor) {
                            self.queueCompressed(received, inflatedSize: size)
                            return
                        }
                        message = try decompressor.decompress(
                            received, with: self.responseEncoding, limit: self.maxReceiveMessageSize)
                    } catch {
                        failure = Self.status(for: error, encoding: self.responseEncoding)
                        return
                    }
                }
                switch self.delivery {
                case .single:
                    self.responseMessage = message
                case .callbacks:
                    self.parts.append(.message(message))
                    self.partsInflatedBytes += message.count
                    self.scheduleDelivery()
                case .buffered:
                    self.buffers!.deliverMessage(message)
                }
            }
        } catch {
            failure = self.status(for: error)
        }
        if let status = failure {
            self.failAttempt(status, resetWith: NGHTTP2_CANCEL.rawValue)
            return 0
        }
        // Flow control follows consumption: bytes go back to the server's window at once (the connection does it,
        // told by the return value), except while an async reader has more than its limit unread.
        if case .buffered = self.delivery { return self.buffers!.received(bytes.count) }
        return bytes.count
    }

    /// What waits for the reader may hold the messages inflated, up to a point: an async reader's backlog up to the
    /// stream's limit, callbacks' up to this many bytes within one turn. Past it a compressed message is checked
    /// (it inflates, within the receive limit) and kept as it came, to be inflated when it is read or delivered:
    /// what a peer can make the client hold is then the bytes it sent, not up to a thousand times as many.
    private static let callbackInflatedBytesLimit = 1 << 20

    /// The inflated size of `message` when it is to be kept compressed for now (see `callbackInflatedBytesLimit`),
    /// nil when it is to be inflated at once.
    private func keepCompressed(
        _ message: [UInt8], checkedBy decompressor: MessageDecompressor
    ) throws(MessageDecompressor.Failure) -> Int? {
        switch self.delivery {
        case .single: return nil
        case .callbacks: if self.partsInflatedBytes < Self.callbackInflatedBytesLimit { return nil }
        case .buffered: if !self.buffers!.isBacklogged { return nil }
        }
        return try decompressor.inflatedSize(message, with: self.responseEncoding, limit: self.maxReceiveMessageSize)
    }

    private func queueCompressed(_ message: [UInt8], inflatedSize: Int) {
        if case .callbacks = self.delivery {
            self.parts.append(.compressedMessage(message, inflatedSize: inflatedSize))
            self.scheduleDelivery()
        } else {
            self.buffers!.deliverCompressedMessage(message, encoding: self.responseEncoding, inflatedSize: inflatedSize)
        }
    }

    /// Whether an attempt's stream is open, read in place (binding the handle copied it: a retain and a release of
    /// its connection).
    private var hasStream: Bool {
        if case .some = self.stream { return true }
        return false
    }

    /// The status a message that could not be inflated ends its attempt with.
    private static func status(for failure: MessageDecompressor.Failure, encoding: CallCompression) -> CallStatus {
        switch failure {
        case .tooLarge(let limit):
            return CallStatus(
                code: .resourceExhausted,
                message: "response message (\(encoding)) decompresses to more than the receive limit of \(limit) bytes")
        case .corrupt(let reason):
            return CallStatus(code: .internal, message: "could not decompress the response message: \(reason)")
        }
    }

    /// The status a deframing failure ends its attempt with.
    private func status(for error: MessageDeframer.Failure) -> CallStatus {
        switch error {
        case .messageTooLarge(let length, let limit):
            return CallStatus(
                code: .resourceExhausted,
                message: "response message of \(length) bytes exceeds the receive limit of \(limit) bytes")
        case .compressedWithoutEncoding:
            return CallStatus(
                code: .internal,
                message: self.head.grpcEncoding.map {
                    "compressed message received with grpc-encoding \"\($0)\", which the client does not implement"
                } ?? "compressed message received without a grpc-encoding header")
        case .invalidFlag(let flag):
            return CallStatus(code: .internal, message: "invalid message flag \(flag) in response")
        }
    }

    package override func streamDataEndedStream() {
        // The server ended the response without trailers while requests are still open: nghttp2 would keep the
        // stream (half-closed) until this side ends them, and a bidirectional call could wait for ever. Its status is
        // final now (INTERNAL: no grpc-status), and this side's half is cancelled. With the requests already ended,
        // nghttp2 closes the stream itself (`streamClosed`).
        guard self.localFailure == nil, let stream = self.stream, !stream.isLocallyClosed else { return }
        let response = self.finalResponse(errorCode: 0)
        self.stream = nil
        stream.reset(errorCode: NGHTTP2_CANCEL.rawValue)
        self.attemptEnded(response, unprocessed: false, retryable: false)
    }

    package override func streamClosed(errorCode: UInt32) {
        guard self.stream != nil else { return }
        // REFUSED_STREAM before any response: the server provably never processed the request (gRFC A6).
        let unprocessed = errorCode == NGHTTP2_REFUSED_STREAM.rawValue && self.mayRetryUnprocessed
        // A response this side refused (its header block over maxHeaderListSize) was the server's answer all the
        // same: the call ran there, and would run again for the same refusal. Not retried by policy.
        self.attemptEnded(
            self.finalResponse(errorCode: errorCode), unprocessed: unprocessed, retryable: self.localFailure == nil)
    }

    package override func streamFailed(_ reason: CallStatus, unprocessed: Bool) {
        guard self.stream != nil else { return }
        self.attemptEnded(
            UnaryResponse(status: reason, initialMetadata: self.head.initialMetadata),
            unprocessed: unprocessed && self.mayRetryUnprocessed)
    }

    /// An attempt the server never processed (refused, or never sent) may go again as it is: nothing of its response
    /// was received, and streamed requests can still be replayed.
    private var mayRetryUnprocessed: Bool {
        self.head.completeBlocks == 0 && (!self.requestsStreamed || self.buffers!.canReplay)
    }

    /// The one true status of the attempt, from what was received.
    private func finalResponse(errorCode: UInt32) -> UnaryResponse {
        var status = self.localFailure ?? self.head.status(errorCode: errorCode)
        if status.isOK {
            if self.deframer.hasPartialMessage {
                status = CallStatus(code: .internal, message: "stream ended in the middle of a message")
            } else if case .single = self.delivery, self.responseMessage == nil {
                status = CallStatus(code: .internal, message: "expected one response message, the call ended with OK but none")
            }
        }
        let metadata = self.head.takeMetadata()
        // Moved out, as the metadata is: the attempt is over, and a copy cost a retain now and a release at deinit.
        let message = status.isOK ? (self.responseMessage.take() ?? []) : []
        return UnaryResponse(
            status: status, message: message,
            initialMetadata: metadata.initial, trailingMetadata: metadata.trailing)
    }
}

/// Runs `body` on a new detached thread.
package func spawnDetachedThread(_ body: @escaping @Sendable () -> Void) {
    final class Box: Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let pointer = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    // Out of threads (EAGAIN) is usually brief: other detached completions are finishing. Wait for one for up to
    // about 100 ms before the last resort, running the body here, which completes the call but inside the caller.
    for attempt in 0..<100 {
        let rc = pthread_create(&thread, nil, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            box.body()
            return nil
        }, pointer)
        if rc == 0 {
            pthread_detach(thread)
            return
        }
        if rc != EAGAIN || attempt == 99 { break }
        usleep(1000)
    }
    Unmanaged<Box>.fromOpaque(pointer).takeRetainedValue().body()
}
