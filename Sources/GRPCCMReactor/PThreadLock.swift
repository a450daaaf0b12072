#if canImport(Glibc)
import Glibc
#endif

/// A pthread mutex around a value (the reactor's inbox, a call's cancellation hand-off).
///
/// Not `Synchronization.Mutex`: on Linux that one waits on raw futexes, which ThreadSanitizer cannot see, so every
/// hand-off through the inbox was reported as a race. A pthread mutex is just as cheap when uncontended and keeps
/// `swift test --sanitize=thread` meaningful.
package final class PThreadLock<Value>: @unchecked Sendable {
    // `@unchecked`: `value` is only touched between pthread_mutex_lock and pthread_mutex_unlock.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    package init(_ value: Value) {
        self.value = value
        self.mutex = .allocate(capacity: 1)
        pthread_mutex_init(self.mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(self.mutex)
        self.mutex.deallocate()
    }

    package func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(self.mutex)
        defer { pthread_mutex_unlock(self.mutex) }
        return try body(&self.value)
    }
}
