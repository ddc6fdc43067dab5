// Unix SOCK_SEQPACKET sockets: one send is one datagram, as a netlink datagram is, so one packet carries one or
// more netlink messages and replies keep their boundaries.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A socket-level failure, with the system's words for it.
public struct SocketError: Error, CustomStringConvertible {
    public let errno: Int32
    public let description: String
    init(_ what: String, errno e: Int32 = Glibc.errno) {
        self.errno = e
        self.description = "\(what): \(String(cString: strerror(e)))"
    }
}

enum UnixAddress {
    /// Runs `body` with a sockaddr_un for `path`; nil when the path does not fit sun_path.
    static func with<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R? {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { return nil }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    static func seqpacket() throws(SocketError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError("socket(AF_UNIX, SOCK_SEQPACKET)") }
        return fd
    }
}

/// The credentials of a connected Unix-socket peer (SO_PEERCRED).
struct PeerCredentials {
    var pid: Int32
    var uid: UInt32
    var gid: UInt32

    /// struct ucred (pid, uid, gid; 12 bytes), which Glibc does not export to Swift.
    private struct UCred {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        var gid: UInt32 = 0
    }

    static func of(_ fd: Int32) -> PeerCredentials? {
        var cred = UCred()
        var length = socklen_t(MemoryLayout<UCred>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &length) == 0 else { return nil }
        return PeerCredentials(pid: cred.pid, uid: cred.uid, gid: cred.gid)
    }
}
