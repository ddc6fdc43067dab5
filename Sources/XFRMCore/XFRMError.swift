/// An error of the control plane: the errno the user API answers with and the message (extack text, or iproute2's
/// wording) the command prints. One type for the SAD, SPD, network model, devices and the user API.
public struct XFRMError: Error, Equatable, CustomStringConvertible, Sendable {
    public let errno: Int32
    public let message: String
    public var description: String { self.message }

    public init(_ errno: Int32, _ message: String) {
        self.errno = errno
        self.message = message
    }

    public init(errno: Int32, message: String) {
        self.init(errno, message)
    }

    /// EINVAL with a message.
    public static func invalid(_ message: String) -> XFRMError { XFRMError(22, message) }
    /// EOPNOTSUPP: for a device, "try software" in crypto offload.
    public static func notSupported(_ message: String = "") -> XFRMError { XFRMError(95, message) }
}

public typealias StateDatabaseError = XFRMError
public typealias PolicyDatabaseError = XFRMError
public typealias NetworkError = XFRMError
public typealias DeviceError = XFRMError
