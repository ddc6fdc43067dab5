#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// struct sockaddr_nl (linux/netlink.h), which Glibc does not export to Swift: 12 bytes, naturally aligned.
public struct SockaddrNetlink {
    public var family: UInt16 = UInt16(AF_NETLINK)
    public var pad: UInt16 = 0
    public var portID: UInt32 = 0
    public var groups: UInt32 = 0
    public init(portID: UInt32 = 0, groups: UInt32 = 0) {
        self.portID = portID
        self.groups = groups
    }
}

/// NETLINK_ROUTE (linux/netlink.h), not exported to Swift by Glibc.
public let netlinkRoute: Int32 = 0
