#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import XFRMCore
import XFRMEngine
import XFRMPacket

/// Hands the IKE messages that arrive on the NAT-T port to a key manager on a local UDP port (`xfrmd --ike-port N`),
/// and sends its replies out from that port, so IKE and ESP can share port 4500 as RFC 3948 has them (the kernel
/// splits them with its UDP_ENCAP socket; here the daemon owns the port and relays).
///
/// Each datagram between the daemon's relay socket (127.0.0.1, an ephemeral port) and the key manager
/// (127.0.0.1:N) is a 40-byte header and the IKE message without its non-ESP marker:
///
///     0      1      2       4       6       8                 24                40
///     | ver=1| fam  | peer port | local port | 0 | peer address (16) | local address (16) | IKE message ...
///
/// `fam` is 4 or 6 (IPv4 addresses in the first 4 bytes of their field), ports and addresses in network order.
/// A reply carries the same header (the peer to send to, the local address to send from); the daemon puts the
/// non-ESP marker back and sends it from the NAT-T port. Malformed replies are counted and dropped.
public final class IKERelay: @unchecked Sendable {
    public static let headerSize = 40
    let fd: Int32
    private let keyManager: sockaddr_in
    private let sockets: OuterSockets
    private let counters: DatapathCounters
    private let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65_536 + 40, alignment: 8)

    init(port: UInt16, sockets: OuterSockets, counters: DatapathCounters) throws(SocketError) {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw SocketError("cannot open the IKE relay socket", errno: errno) }
        var local = sockaddr_in()
        local.sin_family = sa_family_t(AF_INET)
        local.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let bound = withUnsafePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else {
            let e = errno
            close(fd)
            throw SocketError("cannot bind the IKE relay socket", errno: e)
        }
        self.fd = fd
        var km = sockaddr_in()
        km.sin_family = sa_family_t(AF_INET)
        km.sin_port = port.bigEndian
        km.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        self.keyManager = km
        self.sockets = sockets
        self.counters = counters
    }

    deinit {
        close(self.fd)
        self.buffer.deallocate()
    }

    /// Relays one IKE datagram as the stack saw it (IP header, UDP header, non-ESP marker, message).
    func relay(_ packet: PacketBuffer) {
        let p = packet.data
        let n = packet.count
        guard n >= 20 else { return self.fail() }
        let v4 = p.loadByte(at: 0) >> 4 == 4
        let ip = v4 ? Int(p.loadByte(at: 0) & 0x0f) * 4 : 40
        guard n >= ip + 12, v4 || n >= 40 else { return self.fail() }
        let h = self.buffer
        h.initializeMemory(as: UInt8.self, repeating: 0, count: Self.headerSize)
        h.storeBytes(of: 1, toByteOffset: 0, as: UInt8.self)
        h.storeBytes(of: v4 ? 4 : 6, toByteOffset: 1, as: UInt8.self)
        h.storeBE16(p.loadBE16(at: ip), at: 2)  // the peer's source port
        h.storeBE16(p.loadBE16(at: ip + 2), at: 4)  // our port
        if v4 {
            (h + 8).copyMemory(from: p + 12, byteCount: 4)
            (h + 24).copyMemory(from: p + 16, byteCount: 4)
        } else {
            (h + 8).copyMemory(from: p + 8, byteCount: 16)
            (h + 24).copyMemory(from: p + 24, byteCount: 16)
        }
        let message = n - ip - 12
        (h + Self.headerSize).copyMemory(from: p + ip + 12, byteCount: message)
        let sent = withUnsafePointer(to: self.keyManager) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                sendto(self.fd, h, Self.headerSize + message, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        if sent == Self.headerSize + message {
            self.counters.ikeRelayed.wrappingAdd(1, ordering: .relaxed)
        } else {
            self.fail()
        }
    }

    private func fail() { self.counters.ikeRelayErrors.wrappingAdd(1, ordering: .relaxed) }

    /// Sends the key manager's waiting replies to their peers from the NAT-T port (the wire intake calls this when
    /// the relay socket is readable). Only datagrams from the key manager's address and port are taken.
    func drainReplies() {
        for _ in 0..<64 {
            var from = sockaddr_in()
            var fromLength = socklen_t(MemoryLayout<sockaddr_in>.size)
            // Room for the marker in front of the message: read 4 bytes in.
            let n = withUnsafeMutablePointer(to: &from) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    recvfrom(self.fd, self.buffer, 65_536 + 40, 0, $0, &fromLength)
                }
            }
            guard n >= 0 else { return }
            guard from.sin_port == self.keyManager.sin_port, from.sin_addr.s_addr == self.keyManager.sin_addr.s_addr,
                n > Self.headerSize, self.buffer.load(fromByteOffset: 0, as: UInt8.self) == 1
            else {
                self.fail()
                continue
            }
            let family = self.buffer.load(fromByteOffset: 1, as: UInt8.self)
            let port = self.buffer.loadBE16(at: 2)
            let message = n - Self.headerSize
            // The marker goes right before the message, over the end of the header (already read).
            let datagram = self.buffer + Self.headerSize - 4
            var sent = -1
            if family == 4, self.sockets.udp4 >= 0 {
                var to = sockaddr_in()
                to.sin_family = sa_family_t(AF_INET)
                to.sin_port = port.bigEndian
                to.sin_addr.s_addr = self.buffer.load(fromByteOffset: 8, as: UInt32.self)
                datagram.storeBytes(of: 0, as: UInt32.self)
                sent = withUnsafePointer(to: &to) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(self.sockets.udp4, datagram, message + 4, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
            } else if family == 6, self.sockets.udp6 >= 0 {
                var to = sockaddr_in6()
                to.sin6_family = sa_family_t(AF_INET6)
                to.sin6_port = port.bigEndian
                withUnsafeMutableBytes(of: &to.sin6_addr) { $0.copyMemory(from: UnsafeRawBufferPointer(start: self.buffer + 8, count: 16)) }
                datagram.storeBytes(of: 0, as: UInt32.self)
                sent = withUnsafePointer(to: &to) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(self.sockets.udp6, datagram, message + 4, 0, $0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                    }
                }
            }
            if sent == message + 4 {
                self.counters.ikeReplies.wrappingAdd(1, ordering: .relaxed)
            } else {
                self.fail()
            }
        }
    }
}

/// The dispatcher's IKE sink: every IKE datagram to the relay (counted there), the buffers back to the pool.
final class IKESink: PacketSink {
    let relay: IKERelay
    let pool: PacketPool
    init(_ relay: IKERelay, pool: PacketPool) {
        self.relay = relay
        self.pool = pool
    }
    func write(_ batch: inout PacketBatch) {
        for i in 0..<batch.count {
            self.relay.relay(batch[i].buffer)
            self.pool.release(batch[i].buffer)
        }
        batch.removeAll()
    }
}
