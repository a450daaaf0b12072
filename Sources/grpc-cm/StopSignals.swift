import CStopSignals

/// SIGINT and SIGTERM for the commands that run calls: the first cancels what is under way, which then ends as a
/// cancelled call does (the command reports it and exits), instead of the process dying with its output half done.
/// The handler only counts (`CStopSignals`); these poll the count.

/// Waits `nanoseconds`, less if a stop signal comes or the task is cancelled.
func sleepUntilStopSignal(nanoseconds: UInt64) async {
    let end = monotonicNanos() &+ min(nanoseconds, UInt64(Int64.max))
    while css_stop_signal_count() == 0 && !Task.isCancelled {
        let now = monotonicNanos()
        guard now < end else { return }
        try? await Task.sleep(nanoseconds: min(end - now, 20_000_000))
    }
}

/// Runs `body`; a stop signal meanwhile cancels its task (a call under way ends CANCELLED), and what `body` then
/// returns or throws is this function's.
func cancellingOnStopSignal<Value: Sendable>(_ body: @escaping @Sendable () async throws -> Value) async throws -> Value {
    try await withThrowingTaskGroup(of: Value?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            await sleepUntilStopSignal(nanoseconds: .max)
            return nil
        }
        // The body's end, or the signal (which cancels the body: its end comes next).
        while let result = try await group.next() {
            group.cancelAll()
            if let value = result { return value }
        }
        throw CancellationError()
    }
}
