/// A configuration or argument was invalid. The message names the offending field.
public struct ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The field that is wrong, e.g. `"keepAliveTime"`.
    public var field: String
    /// What is wrong with it.
    public var message: String

    /// An error naming `field`, saying `message`.
    public init(field: String, message: String) {
        self.field = field
        self.message = message
    }

    public var description: String { "invalid configuration: \(self.field): \(self.message)" }
}
