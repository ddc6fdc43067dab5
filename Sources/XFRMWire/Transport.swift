/// Where XFRM requests go: an in-process stack today; a daemon's Unix socket or the kernel's NETLINK_XFRM later.
/// Exactly the netlink request/response exchange: one request in, then the responses (a dump's messages followed
/// by `.done`, a single reply, or an `.error` carrying 0 for an ACK or -errno with the extack text).
public protocol XfrmTransport: AnyObject {
    func request(_ message: XfrmMessage) -> [XfrmMessage]
}

/// errno values used in replies (Linux numbering).
public enum Errno {
    public static let ENOENT: Int32 = 2
    public static let ESRCH: Int32 = 3
    public static let EAGAIN: Int32 = 11
    public static let ENOMEM: Int32 = 12
    public static let EEXIST: Int32 = 17
    public static let ENODEV: Int32 = 19
    public static let EINVAL: Int32 = 22
    public static let ENOSPC: Int32 = 28
    public static let ERANGE: Int32 = 34
    public static let EMSGSIZE: Int32 = 90
    public static let ENOPROTOOPT: Int32 = 92
    public static let EPROTONOSUPPORT: Int32 = 93
    public static let EOPNOTSUPP: Int32 = 95
    public static let EHOSTUNREACH: Int32 = 113

    /// strerror() text, as iproute2 prints after "RTNETLINK answers: ".
    public static func text(_ errno: Int32) -> String {
        switch errno {
        case ENOENT: "No such file or directory"
        case ESRCH: "No such process"
        case EAGAIN: "Resource temporarily unavailable"
        case ENOMEM: "Cannot allocate memory"
        case EEXIST: "File exists"
        case ENODEV: "No such device"
        case EINVAL: "Invalid argument"
        case ENOSPC: "No space left on device"
        case ERANGE: "Numerical result out of range"
        case EMSGSIZE: "Message too long"
        case ENOPROTOOPT: "Protocol not available"
        case EPROTONOSUPPORT: "Protocol not supported"
        case EOPNOTSUPP: "Operation not supported"
        case EHOSTUNREACH: "No route to host"
        default: "Unknown error \(errno)"
        }
    }
}
