// A host with an epoll loop of its own drives ours: no thread of ours runs, and the host decides when we get a turn.
//
//   swift run foreign-loop-example [TARGET]   (default: an embedded echo server on a loop of its own thread)
//
// The pattern is libcurl's multi-socket one: the host watches our pollable descriptor (our epoll fd, readable when
// we have work) among its own fds, sleeps no longer than `nextTimeout` (our next timer), and calls `runOnce()` when
// either says so. Here the host also has a timer of its own that ticks every 100 ms, to show that its own work and ours
// share one thread.
import CReactor  // for <sys/epoll.h>, which Swift's Glibc does not export
import GRPCConnectionManager
import GRPCEchoServer

#if canImport(Glibc)
import Glibc
#endif

let explicitTarget = CommandLine.arguments.dropFirst().first
let server = explicitTarget == nil ? try EchoServer() : nil  // on a loop of its own thread
let target = explicitTarget ?? server!.address

// Our loop, never started: the host drives it.
let ours = try ReactorLoop()

// The host's loop: its own epoll instance, with our descriptor in it.
let host = epoll_create1(Int32(EPOLL_CLOEXEC))
var watchOurs = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: 1))
epoll_ctl(host, EPOLL_CTL_ADD, ours.pollableDescriptor, &watchOurs)

// The first turn makes this thread our loop's; from here on, everything of ours runs on it.
try ours.runOnce()
let channel = try GRPCChannel(target: target, eventLoop: ours)

/// What the calls came to; touched on this thread only (completions run inside runOnce).
final class Tally: @unchecked Sendable {
    // `@unchecked`: this thread only.
    var done = 0
    var ok = 0
}
let tally = Tally()
let calls = 20
for index in 0..<calls {
    let payload = Array("message \(index)".utf8)
    channel.unary(path: "/echo.Echo/Get", request: payload, options: RequestOptions(timeout: .seconds(5))) { response in
        tally.done += 1
        if response.status.isOK && response.message == payload { tally.ok += 1 }
        print("call \(index): \(response.status.code) \(String(decoding: response.message, as: UTF8.self))")
    }
}

/// The host's own periodic work, every 100 ms.
var hostTicks = 0
var nextHostTick = ContinuousClock.now + .milliseconds(100)
var fired = [epoll_event](repeating: epoll_event(), count: 16)
while tally.done < calls {
    // Sleep until our descriptor is readable, our next timer is due, or the host's own tick is.
    let untilHostTick = ContinuousClock.now.duration(to: nextHostTick)
    let wait = ours.nextTimeout.map { min($0, untilHostTick) } ?? untilHostTick
    let timeout = Int32(clamping: (max(wait.nanoseconds, 0) + 999_999) / 1_000_000)
    let n = epoll_wait(host, &fired, Int32(fired.count), timeout)
    if ContinuousClock.now >= nextHostTick {
        hostTicks += 1
        nextHostTick = nextHostTick + .milliseconds(100)
    }
    // Our turn when our descriptor fired, or our timer is due (a turn with nothing to do costs one epoll_wait).
    if n > 0 || ours.nextTimeout == .zero { try ours.runOnce() }
}

print("foreign-loop-example: \(tally.ok) of \(calls) calls OK, driven by the host's epoll (\(hostTicks) host ticks meanwhile)")
ours.shutdown()  // on the driving thread: finishes at once
close(host)
server?.close()
exit(tally.ok == calls ? 0 : 1)
