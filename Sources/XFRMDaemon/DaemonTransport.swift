// The client side of the daemon's control socket: `xfrm -S PATH` sends its XFRM netlink requests here instead of
// to an in-process stack or the kernel.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import XFRMWire

/// XFRM netlink over the daemon's Unix SOCK_SEQPACKET socket.
public final class DaemonTransport: XfrmTransport {
    private let fd: Int32
    private var sequence: UInt32 = 0
    private var buffer = [UInt8](repeating: 0, count: ControlProtocol.maximumDatagram)

    /// Connects to the daemon at `path`; the error says plainly when no daemon listens there.
    public init(path: String) throws(SocketError) {
        let fd = try UnixAddress.seqpacket()
        guard let ok = UnixAddress.with(path, { connect(fd, $0, $1) }) else {
            close(fd)
            throw SocketError("socket path \"\(path)\" is too long", errno: ENAMETOOLONG)
        }
        guard ok == 0 else {
            let e = errno
            close(fd)
            if e == ENOENT || e == ECONNREFUSED {
                throw SocketError("no xfrmd is running at \(path) (start xfrmd, pick another socket with -S, or use --offline)",
                                  errno: e)
            }
            throw SocketError("cannot connect to xfrmd at \(path)", errno: e)
        }
        self.fd = fd
    }

    deinit { close(self.fd) }

    public func request(_ message: XfrmMessage) -> [XfrmMessage] {
        self.sequence &+= 1
        var m = message
        m.sequence = self.sequence
        let bytes = m.encode()
        let sent = bytes.withUnsafeBytes { send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == bytes.count else { return [Self.localError(errno)] }
        let dump = m.flags & NetlinkFlags.dump == NetlinkFlags.dump
        let wantsAck = m.flags & NetlinkFlags.ack != 0
        var out: [XfrmMessage] = []
        while true {
            guard let messages = self.receive() else { return out + [Self.localError(errno == 0 ? ECONNRESET : errno)] }
            for r in messages where r.sequence == self.sequence {
                out.append(r)
                if case .error = r.body { return out }
                if case .done = r.body { return out }
                if !dump && !wantsAck { return out }
            }
        }
    }

    /// Asks for the daemon's events (≈ joining the XFRMNLGRP_* groups) and calls `handle` with each until it
    /// returns false or the daemon goes away. A `.error(ENOBUFS)` message says events were lost.
    public func monitor(groups: UInt32 = ControlProtocol.allGroups, _ handle: (XfrmMessage) -> Bool) -> Bool {
        let join = ControlProtocol.joinMessage(groups: groups).encode()
        guard join.withUnsafeBytes({ send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == join.count
        else { return false }
        while let messages = self.receive() {
            for m in messages where !handle(m) { return true }
        }
        return false
    }

    private func receive() -> [XfrmMessage]? {
        while true {
            let n = self.buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            do throws(WireError) {
                return try XfrmMessage.decodeAll(Array(self.buffer[0..<n]))
            } catch {
                // An answer we cannot read ends the exchange with an error instead of waiting for another.
                var m = XfrmMessage(type: NetlinkControlType.error, flags: 0,
                                    body: .error(errno: -EBADMSG, message: "undecodable reply from xfrmd: \(error)"))
                m.sequence = self.sequence
                return [m]
            }
        }
    }

    private static func localError(_ e: Int32) -> XfrmMessage {
        XfrmMessage(type: NetlinkControlType.error, flags: 0, body: .error(errno: -e, message: ""))
    }
}
