import GRPCConnectionManager
import ServiceLifecycle

/// A `ConnectionManager` as a swift-service-lifecycle `Service`, so that a server application hands it to its
/// `ServiceGroup` beside its other services:
///
/// ```swift
/// let manager = try ConnectionManager(configuration: configuration, logger: logger)
/// let group = ServiceGroup(
///     services: [ConnectionManagerService(manager), myServer],
///     gracefulShutdownSignals: [.sigterm], logger: logger)
/// try await group.run()
/// ```
///
/// `run()` waits until the group shuts down gracefully, then closes the manager with `gracePeriod`: calls already
/// on a stream get that long to finish, calls still waiting for a connection or a retry end UNAVAILABLE at once, and
/// `run()` returns once everything is closed. Put it before the services that use it in the group's list (a
/// group shuts services down in reverse order, so they stop first and their last calls still find it open). If the task running it is
/// cancelled instead, the manager closes at once, without a grace period, and `run()` returns once it has closed.
public struct ConnectionManagerService: Service {
    /// The manager this service closes.
    public let manager: ConnectionManager
    /// How long calls on a stream may run once the graceful shutdown begins. Default 10 s.
    public var gracePeriod: Duration

    /// A service that closes `manager`, letting calls run for up to `gracePeriod`, when the group shuts down.
    public init(_ manager: ConnectionManager, gracePeriod: Duration = .seconds(10)) {
        self.manager = manager
        self.gracePeriod = gracePeriod
    }

    /// Waits for the group's graceful shutdown, then closes the manager with the grace period (cancelled instead:
    /// closes at once).
    public func run() async throws {
        do {
            try await gracefulShutdown()
        } catch {
            // Cancelled rather than asked to shut down: nobody waits for the grace period, but `run()` still returns
            // only once the calls have ended and the connections closed (`closeNow()` would return before its loops
            // had done any of it, and the application would go on to tear down under them).
            await self.manager.close(gracePeriod: .zero)
            return
        }
        await self.manager.close(gracePeriod: self.gracePeriod)
    }
}
