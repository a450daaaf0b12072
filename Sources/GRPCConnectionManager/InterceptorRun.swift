import GRPCCMCalls
import GRPCCMWire

/// Runs a channel's interceptors over a call before it starts: synchronously on the caller's thread until one of them
/// asks to finish asynchronously, then (`Suspension.finish`) in a task, off the loop.
enum InterceptorRun {
    enum Outcome {
        /// Every interceptor proceeded: the call starts with the metadata they left.
        case done
        /// One failed the call.
        case failed(CallStatus)
        /// One has work to await first.
        case suspended(Suspension)
    }

    /// Runs `interceptors` from `index` on over `call`, collecting their observers in order.
    static func run(
        _ interceptors: [any CallInterceptor], from index: Int, _ call: inout InterceptedCall,
        observers: inout [any CallObserver]
    ) -> Outcome {
        var index = index
        while index < interceptors.count {
            let decision = interceptors[index].intercept(&call)
            if let observer = decision.observer { observers.append(observer) }
            switch decision.action {
            case .proceed: break
            case .fail(let status): return .failed(Self.failure(status, by: interceptors[index]))
            case .proceedAfter(let work): return .suspended(Suspension(index: index, work: work, call: call))
            }
            index += 1
        }
        return .done
    }

    /// The status an interceptor failed a call with. OK is no failure: taken as one, the call would "succeed" with
    /// an empty message it never sent for. It becomes INTERNAL, naming the interceptor.
    static func failure(_ status: CallStatus, by interceptor: any CallInterceptor) -> CallStatus {
        guard status.isOK else { return status }
        return CallStatus(code: .internal, message: "interceptor \(type(of: interceptor)) failed the call with status OK")
    }

    /// Where a run stopped to await an interceptor's work.
    struct Suspension: Sendable {
        /// The interceptor that asked.
        let index: Int
        let work: @Sendable () async throws -> CallMetadata
        /// The call as it was then.
        let call: InterceptedCall

        /// Awaits the work, adds its metadata, runs the interceptors after it (awaiting any that ask too).
        /// - Returns: The final metadata, the observers of the interceptors that ran here, and a failure if one
        ///   failed the call (a thrown `CallError` its status; any other error UNAVAILABLE).
        func finish(_ interceptors: [any CallInterceptor]) async -> (CallMetadata, [any CallObserver], CallStatus?) {
            var call = self.call
            var index = self.index
            var work = self.work
            var observers: [any CallObserver] = []
            while true {
                do {
                    call.metadata.add(contentsOf: try await work())
                } catch let error as CallError {
                    return (call.metadata, observers, InterceptorRun.failure(error.status, by: interceptors[index]))
                } catch {
                    let status = CallStatus(
                        code: .unavailable, message: "interceptor \(type(of: interceptors[index])) failed: \(error)")
                    return (call.metadata, observers, status)
                }
                switch InterceptorRun.run(interceptors, from: index + 1, &call, observers: &observers) {
                case .done: return (call.metadata, observers, nil)
                case .failed(let status): return (call.metadata, observers, status)
                case .suspended(let next):
                    index = next.index
                    work = next.work
                    call = next.call
                }
            }
        }
    }
}
