#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import XFRMCore
import XFRMEngine
import XFRMPacket

/// The outer side's writes: what the stack protected, to the socket its outer header names — raw ESP with the
/// stack's IPv4 header as built (IP_HDRINCL), ESP in UDP after its UDP header to the SA's port, and for IPv6 the
/// payload with the destination and our source (IPV6_PKTINFO; the kernel writes the IPv6 header). One
/// sendmmsg(2) per socket per batch. One sink per worker (its arrays are its own); anything else is counted and
/// dropped: the wire carries ESP only.
final class WireSink: PacketSink {
    private let sockets: OuterSockets
    private let pool: PacketPool
    private let counters: DatapathCounters
    private let engine: EngineCounters
    private var groups: [Group]
    private var sent: [PacketBuffer] = []

    /// The datagrams for one socket.
    private final class Group {
        let fd: Int32
        let namelen: socklen_t
        let v6: Bool
        var count = 0
        let bufs: UnsafeMutablePointer<UnsafeMutableRawPointer?>
        let lens: UnsafeMutablePointer<Int>
        let names: UnsafeMutablePointer<sockaddr_in6>
        let control: UnsafeMutablePointer<UInt8>
        let controlLens: UnsafeMutablePointer<Int>
        /// Room for two control messages: the source address (IP_PKTINFO: CMSG_SPACE(12) = 32; IPV6_PKTINFO: 40)
        /// and the outer TOS / traffic class with its ECN bits (IP_TOS / IPV6_TCLASS, an int: 24).
        static let controlSize = 64

        init(fd: Int32, v6: Bool) {
            self.fd = fd
            self.v6 = v6
            self.namelen = socklen_t(v6 ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size)
            let n = EngineConstants.batchSize
            self.bufs = .allocate(capacity: n)
            self.lens = .allocate(capacity: n)
            self.names = .allocate(capacity: n)
            self.control = .allocate(capacity: n * Self.controlSize)
            self.controlLens = .allocate(capacity: n)
        }

        deinit {
            self.bufs.deallocate()
            self.lens.deallocate()
            self.names.deallocate()
            self.control.deallocate()
            self.controlLens.deallocate()
        }
    }

    private static let raw4 = 0, udp4 = 1, raw6 = 2, udp6 = 3

    init(sockets: OuterSockets, pool: PacketPool, counters: DatapathCounters, engine: EngineCounters) {
        self.sockets = sockets
        self.pool = pool
        self.counters = counters
        self.engine = engine
        self.groups = [Group(fd: sockets.raw4, v6: false), Group(fd: sockets.udp4, v6: false),
                       Group(fd: sockets.raw6, v6: true), Group(fd: sockets.udp6, v6: true)]
        self.sent.reserveCapacity(EngineConstants.batchSize)
    }

    func write(_ batch: inout PacketBatch) {
        precondition(batch.count <= EngineConstants.batchSize, "the dispatcher writes a sink at most a batch at a time")
        for i in 0..<batch.count {
            let buf = batch[i].buffer
            if self.add(buf) {
                self.sent.append(buf)
            } else {
                self.engine.unprotected.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(buf)
            }
        }
        batch.removeAll()
        for g in self.groups where g.count > 0 {
            var failed: UInt32 = 0
            let ok = xfrm_send_batch(g.fd, g.bufs, g.lens, g.names, g.namelen, g.control, g.controlLens,
                                     Group.controlSize, UInt32(g.count), &failed)
            self.counters.wireSent.wrappingAdd(UInt64(max(ok, 0)), ordering: .relaxed)
            self.counters.sendErrors.wrappingAdd(UInt64(failed), ordering: .relaxed)
            g.count = 0
        }
        for b in self.sent { self.pool.release(b) }
        self.sent.removeAll(keepingCapacity: true)
    }

    /// Files one packet under its socket; false when it is not ESP (or ESP in UDP from our port) for a socket we have.
    private func add(_ buf: PacketBuffer) -> Bool {
        let p = buf.data
        let count = buf.count
        guard count >= 20 else { return false }
        switch p.loadByte(at: 0) >> 4 {
        case 4:
            let proto = p.loadByte(at: 9)
            let ihl = Int(p.loadByte(at: 0) & 0x0f) * 4
            if proto == UInt8(IPPROTO_ESP), self.sockets.raw4 >= 0 {
                let g = self.groups[Self.raw4]
                self.name4(g, p.load(fromByteOffset: 16, as: UInt32.self), port: 0)
                g.controlLens[g.count] = 0  // IP_HDRINCL: the stack's own header, source and TOS included
                g.bufs[g.count] = p
                g.lens[g.count] = count
                g.count += 1
                return true
            }
            if proto == UInt8(IPPROTO_UDP), count >= ihl + 12, p.loadBE16(at: ihl) == self.sockets.udpPort,
                p.loadBE32(at: ihl + 8) != 0
            {
                let g = self.groups[Self.udp4]
                self.name4(g, p.load(fromByteOffset: 16, as: UInt32.self), port: p.loadBE16(at: ihl + 2))
                // The kernel writes the IPv4 header: it gets the SA's source (IP_PKTINFO's ipi_spec_dst) and the
                // outer TOS the stack chose, ECN included (RFC 6040), as control messages.
                let c = UnsafeMutableRawPointer(g.control + g.count * Group.controlSize)
                c.initializeMemory(as: UInt8.self, repeating: 0, count: Group.controlSize)
                c.storeBytes(of: 28, toByteOffset: 0, as: Int.self)  // CMSG_LEN(sizeof(struct in_pktinfo))
                c.storeBytes(of: Int32(IPPROTO_IP), toByteOffset: 8, as: Int32.self)
                c.storeBytes(of: Int32(IP_PKTINFO), toByteOffset: 12, as: Int32.self)
                (c + 20).copyMemory(from: p + 12, byteCount: 4)  // ipi_spec_dst
                Self.storeTOS(c + 32, level: Int32(IPPROTO_IP), type: Int32(IP_TOS), value: p.loadByte(at: 1))
                g.controlLens[g.count] = 56
                g.bufs[g.count] = p + ihl + 8
                g.lens[g.count] = count - ihl - 8
                g.count += 1
                return true
            }
        case 6 where count >= 40:
            let next = p.loadByte(at: 6)
            if next == UInt8(IPPROTO_ESP), self.sockets.raw6 >= 0 {
                self.add6(self.groups[Self.raw6], p, payload: 40, count: count, port: 0)
                return true
            }
            if next == UInt8(IPPROTO_UDP), count >= 52, p.loadBE16(at: 40) == self.sockets.udpPort,
                p.loadBE32(at: 48) != 0, self.sockets.udp6 >= 0
            {
                self.add6(self.groups[Self.udp6], p, payload: 48, count: count, port: p.loadBE16(at: 42))
                return true
            }
        default:
            break
        }
        return false
    }

    @inline(__always)
    private func name4(_ g: Group, _ addressNetworkOrder: UInt32, port: UInt16) {
        (g.names + g.count).withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
            sin.pointee = sockaddr_in()
            sin.pointee.sin_family = sa_family_t(AF_INET)
            sin.pointee.sin_port = port.bigEndian
            sin.pointee.sin_addr.s_addr = addressNetworkOrder
        }
    }

    /// A control message carrying an int: IP_TOS or IPV6_TCLASS (CMSG_LEN(4) = 20, CMSG_SPACE(4) = 24).
    @inline(__always)
    private static func storeTOS(_ c: UnsafeMutableRawPointer, level: Int32, type: Int32, value: UInt8) {
        c.storeBytes(of: 20, toByteOffset: 0, as: Int.self)
        c.storeBytes(of: level, toByteOffset: 8, as: Int32.self)
        c.storeBytes(of: type, toByteOffset: 12, as: Int32.self)
        c.storeBytes(of: Int32(value), toByteOffset: 16, as: Int32.self)
    }

    /// IPv6: the payload, to the destination, from our source (an IPV6_PKTINFO control message).
    @inline(__always)
    private func add6(_ g: Group, _ p: UnsafeMutableRawPointer, payload: Int, count: Int, port: UInt16) {
        let i = g.count
        g.names[i] = sockaddr_in6()
        g.names[i].sin6_family = sa_family_t(AF_INET6)
        g.names[i].sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &g.names[i].sin6_addr) {
            $0.copyMemory(from: UnsafeRawBufferPointer(start: p + 24, count: 16))
        }
        let c = UnsafeMutableRawPointer(g.control + i * Group.controlSize)
        c.initializeMemory(as: UInt8.self, repeating: 0, count: Group.controlSize)
        c.storeBytes(of: 36, toByteOffset: 0, as: Int.self)  // CMSG_LEN(sizeof(struct in6_pktinfo))
        c.storeBytes(of: Int32(IPPROTO_IPV6), toByteOffset: 8, as: Int32.self)
        c.storeBytes(of: Sockopt.ipv6Pktinfo, toByteOffset: 12, as: Int32.self)
        (c + 16).copyMemory(from: p + 8, byteCount: 16)
        // The traffic class (ECN included) the stack chose for the outer header.
        let tclass = UInt8(truncatingIfNeeded: p.loadBE16(at: 0) >> 4)
        Self.storeTOS(c + 40, level: Int32(IPPROTO_IPV6), type: Sockopt.ipv6Tclass, value: tclass)
        g.controlLens[i] = Group.controlSize
        g.bufs[i] = p + payload
        g.lens[i] = count - payload
        g.count += 1
    }
}
