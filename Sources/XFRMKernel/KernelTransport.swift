// XFRM netlink to the Linux kernel (NETLINK_XFRM): the same messages, encoded by the same codec, that the
// in-process server and the daemon answer. `xfrm --kernel` runs the `ip xfrm` grammar over this transport.
//
// The socket asks for what iproute2 asks for: NETLINK_CAP_ACK (error replies echo only the request's header) and
// NETLINK_EXT_ACK (the extack text), so the codec decodes the kernel's replies as it decodes the server's.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import XFRMWire

/// A failure to talk to the kernel at all (no socket, no permission), as opposed to an error reply.
public struct KernelNetlinkError: Error, CustomStringConvertible {
    public let description: String
    public let errno: Int32
    init(_ what: String, errno e: Int32) {
        self.errno = e
        self.description = "\(what): \(String(cString: strerror(e)))"
    }
}

/// netlink numbers not exported to Swift by Glibc (linux/netlink.h, linux/xfrm.h).
enum NetlinkConstant {
    static let netlinkXFRM: Int32 = 6
    static let solNetlink: Int32 = 270
    static let addMembership: Int32 = 1
    static let capAck: Int32 = 10
    static let extAck: Int32 = 11
    /// XFRMNLGRP_ACQUIRE ... XFRMNLGRP_MAPPING.
    static let monitorGroups: [Int32] = [1, 2, 3, 4, 5, 6, 7, 8]
}

/// One NETLINK_XFRM socket; each `request` sends one message and reads the kernel's answer to it.
public final class KernelXfrmTransport: XfrmTransport {
    private let fd: Int32
    private var sequence: UInt32
    private var buffer = [UInt8](repeating: 0, count: 1 << 16)
    /// The port id the kernel gave this socket.
    public let portID: UInt32

    public init() throws(KernelNetlinkError) {
        let fd = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), NetlinkConstant.netlinkXFRM)
        guard fd >= 0 else { throw KernelNetlinkError("Cannot open netlink socket", errno: errno) }
        var one: Int32 = 1
        for option in [NetlinkConstant.capAck, NetlinkConstant.extAck] {
            _ = setsockopt(fd, NetlinkConstant.solNetlink, option, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        var address = SockaddrNetlink()
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<SockaddrNetlink>.size))
            }
        }
        guard bound == 0 else {
            let e = errno
            close(fd)
            throw KernelNetlinkError("Cannot bind netlink socket", errno: e)
        }
        var length = socklen_t(MemoryLayout<SockaddrNetlink>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        self.fd = fd
        self.portID = address.portID
        self.sequence = UInt32(truncatingIfNeeded: time(nil))
    }

    deinit { close(self.fd) }

    /// Sends `message` and collects the answer: a dump's messages up to NLMSG_DONE, the reply to a GET, and the
    /// ACK or error when NLM_F_ACK is set. A socket error becomes an error reply with its errno, so the caller
    /// prints it as iproute2 would.
    public func request(_ message: XfrmMessage) -> [XfrmMessage] {
        self.sequence &+= 1
        var m = message
        m.sequence = self.sequence
        m.portID = 0
        let bytes = m.encode()
        let sent = bytes.withUnsafeBytes { send(self.fd, $0.baseAddress, $0.count, 0) }
        guard sent == bytes.count else { return [Self.localError(errno)] }
        let dump = m.flags & NetlinkFlags.dump == NetlinkFlags.dump
        let wantsAck = m.flags & NetlinkFlags.ack != 0
        var out: [XfrmMessage] = []
        while true {
            let n = self.buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                return out + [Self.localError(errno)]
            }
            let messages: [XfrmMessage]
            do throws(WireError) {
                messages = try XfrmMessage.decodeAll(Array(self.buffer[0..<n]))
            } catch {
                return out + [XfrmMessage(type: NetlinkControlType.error, flags: 0,
                                          body: .error(errno: -Errno.EINVAL, message: "undecodable reply: \(error)"))]
            }
            for r in messages where r.sequence == self.sequence {
                out.append(r)
                if case .error = r.body { return out }  // an ACK or an error ends every exchange
                if case .done = r.body { return out }
                if !dump && !wantsAck { return out }  // a GET's single reply
            }
        }
    }

    /// Joins the XFRM multicast groups (what `ip xfrm monitor` listens to) and calls `handle` with each event
    /// until it returns false or the socket fails.
    public func monitor(_ handle: (XfrmMessage) -> Bool) throws(KernelNetlinkError) {
        for group in NetlinkConstant.monitorGroups {
            var g = group
            guard setsockopt(self.fd, NetlinkConstant.solNetlink, NetlinkConstant.addMembership, &g,
                             socklen_t(MemoryLayout<Int32>.size)) == 0 else {
                throw KernelNetlinkError("Cannot join the XFRM multicast groups", errno: errno)
            }
        }
        while true {
            let n = self.buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                // As iproute2's rtnl_listen: an overrun is reported and listening goes on.
                if errno == ENOBUFS {
                    let text = "netlink receive error No buffer space available (105)\n"
                    _ = text.withCString { write(2, $0, strlen($0)) }
                    continue
                }
                throw KernelNetlinkError("netlink receive error", errno: errno)
            }
            guard let messages = try? XfrmMessage.decodeAll(Array(self.buffer[0..<n])) else { continue }
            for m in messages where !handle(m) { return }
        }
    }

    private static func localError(_ e: Int32) -> XfrmMessage {
        XfrmMessage(type: NetlinkControlType.error, flags: 0, body: .error(errno: -e, message: ""))
    }
}
