#if canImport(Glibc)
import Glibc
#endif

/// A system call made by the reactor failed. Not about any one call: it describes the runtime.
public struct ReactorError: Error, Sendable, CustomStringConvertible {
    /// The operation that failed, such as `"connect"`.
    public var operation: String
    /// The `errno` it reported.
    public var errno: Int32

    /// An error for `operation` failing with `errno`.
    public init(operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(self.operation) failed: \(String(cString: strerror(self.errno))) (errno \(self.errno))"
    }
}
