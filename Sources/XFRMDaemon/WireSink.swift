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
/// stack's IPv4 header as built (IP_HDRINCL), ESP in UDP after its UDP header to the SA's port, fragments of either
/// as built (IPPROTO_RAW, IPv4 or IPv6), and for whole IPv6 packets the payload with the destination and our source
/// (IPV6_PKTINFO; the kernel writes the IPv6 header). One
/// sendmmsg(2) per socket per batch. One sink per worker (its arrays are its own); anything else is counted and
/// dropped: the wire carries ESP only.
final class WireSink: PacketSink {
    private let sockets: OuterSockets
    private let pool: PacketPool
    private let counters: DatapathCounters
    private let engine: EngineCounters
    // One thread owns a sink, so its per-packet state skips the dynamic exclusivity check (see Dispatcher.pending).
    @exclusivity(unchecked) private var groups: [Group]
    @exclusivity(unchecked) private var sent: [PacketBuffer] = []
    /// The group the packet before went to (-1: none yet in this write).
    @exclusivity(unchecked) private var current = -1
    /// The source and identification of a packet whose first fragment was refused: its other fragments are too.
    private var refusedFragments: (source: UInt32, id: UInt16)? = nil
    /// The same for IPv6 (the stack's identifications are random 32-bit numbers).
    private var refusedFragments6: UInt32? = nil

    /// The messages for one socket: `count` messages gathering `iovCount` datagrams. On the UDP sockets, a datagram
    /// that follows one of the same size to the same peer with the same control messages (source address, TOS)
    /// joins its message, which then leaves as one UDP GSO send (a UDP_SEGMENT control message; the last datagram
    /// may be shorter, as udp_send_skb cuts it) — what wireguard-go's coalesceMessages does.
    private final class Group {
        let fd: Int32
        let namelen: socklen_t
        let v6: Bool
        /// Datagrams may be merged into GSO sends (UDP sockets, until the kernel answers a GSO send with EIO).
        var gso: Bool
        var count = 0
        var iovCount = 0
        let bufs: UnsafeMutablePointer<UnsafeMutableRawPointer?>
        let lens: UnsafeMutablePointer<Int>
        let iovStarts: UnsafeMutablePointer<UInt32>
        let iovCounts: UnsafeMutablePointer<UInt32>
        /// Per message: the bytes it carries (its segment size is its first datagram's length).
        let totals: UnsafeMutablePointer<Int>
        let names: UnsafeMutablePointer<sockaddr_in6>
        let control: UnsafeMutablePointer<UInt8>
        let controlLens: UnsafeMutablePointer<Int>
        let refused: UnsafeMutablePointer<Int32>
        /// Room for three control messages: the source address (IP_PKTINFO: CMSG_SPACE(12) = 32; IPV6_PKTINFO: 40),
        /// the outer TOS / traffic class with its ECN bits (IP_TOS / IPV6_TCLASS, an int: 24) and, on a GSO send,
        /// UDP_SEGMENT (a u16: CMSG_SPACE(2) = 24).
        static let controlSize = 88

        init(fd: Int32, v6: Bool, gso: Bool) {
            self.fd = fd
            self.v6 = v6
            self.gso = gso
            self.namelen = socklen_t(v6 ? MemoryLayout<sockaddr_in6>.size : MemoryLayout<sockaddr_in>.size)
            let n = EngineConstants.batchSize
            self.bufs = .allocate(capacity: n)
            self.lens = .allocate(capacity: n)
            self.iovStarts = .allocate(capacity: n)
            self.iovCounts = .allocate(capacity: n)
            self.totals = .allocate(capacity: n)
            self.names = .allocate(capacity: n)
            self.control = .allocate(capacity: n * Self.controlSize)
            self.controlLens = .allocate(capacity: n)
            self.refused = .allocate(capacity: n)
        }

        deinit {
            self.bufs.deallocate()
            self.lens.deallocate()
            self.iovStarts.deallocate()
            self.iovCounts.deallocate()
            self.totals.deallocate()
            self.names.deallocate()
            self.control.deallocate()
            self.controlLens.deallocate()
            self.refused.deallocate()
        }

        /// Takes the datagram (`bufs`/`lens` at `iovCount`) and the message prepared at `count` (its name and
        /// control messages): merged into the message before it when GSO allows, else as a message of its own.
        func commit() {
            let n = self.iovCount
            let len = self.lens[n]
            self.iovCount += 1
            if self.gso && self.count > 0 {
                let m = self.count - 1
                let segments = Int(self.iovCounts[m])
                let size = self.lens[Int(self.iovStarts[m])]
                if segments < WireSink.maxSegments, len <= size, self.lens[n - 1] == size,
                    self.totals[m] + len <= WireSink.maxGSOBytes, self.controlLens[m] == self.controlLens[self.count],
                    memcmp(self.names + m, self.names + self.count, Int(self.namelen)) == 0,
                    memcmp(self.control + m * Self.controlSize, self.control + self.count * Self.controlSize,
                           self.controlLens[m]) == 0
                {
                    self.iovCounts[m] += 1
                    self.totals[m] += len
                    return
                }
            }
            self.iovStarts[self.count] = UInt32(n)
            self.iovCounts[self.count] = 1
            self.totals[self.count] = len
            self.count += 1
        }
    }

    /// The most datagrams one GSO send carries (the kernel's UDP_MAX_SEGMENTS is 128; a sink writes at most a batch).
    static let maxSegments = 128
    /// The most bytes one GSO send carries: an IPv4 packet's 65,535 less its IP and UDP headers.
    static let maxGSOBytes = 65_535 - 20 - 8

    private static let raw4 = 0, udp4 = 1, raw6 = 2, udp6 = 3, frag4 = 4, frag6 = 5

    init(sockets: OuterSockets, pool: PacketPool, counters: DatapathCounters, engine: EngineCounters, gso: Bool = true) {
        self.sockets = sockets
        self.pool = pool
        self.counters = counters
        self.engine = engine
        self.groups = [Group(fd: sockets.raw4, v6: false, gso: false), Group(fd: sockets.udp4, v6: false, gso: gso),
                       Group(fd: sockets.raw6, v6: true, gso: false), Group(fd: sockets.udp6, v6: true, gso: gso),
                       Group(fd: sockets.frag4, v6: false, gso: false),
                       Group(fd: sockets.frag6, v6: true, gso: false)]
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
        for g in self.groups where g.count > 0 { self.flush(g) }
        self.current = -1
        for b in self.sent { self.pool.release(b) }
        self.sent.removeAll(keepingCapacity: true)
    }

    /// Sends a group's messages with one sendmmsg(2), a UDP_SEGMENT control message on those that carry several
    /// datagrams. A GSO send the kernel refuses goes again one datagram at a time (EIO — no checksum offload on the
    /// way out, as wireguard-go's ErrUDPGSODisabled — also turns GSO off for this socket's sink); every datagram
    /// that still cannot leave is counted in `send_errors`.
    private func flush(_ g: Group) {
        for m in 0..<g.count where g.iovCounts[m] > 1 {
            let c = UnsafeMutableRawPointer(g.control + m * Group.controlSize) + g.controlLens[m]
            c.storeBytes(of: 18, toByteOffset: 0, as: Int.self)  // CMSG_LEN(sizeof(u16))
            c.storeBytes(of: Int32(IPPROTO_UDP), toByteOffset: 8, as: Int32.self)
            c.storeBytes(of: Int32(103), toByteOffset: 12, as: Int32.self)  // UDP_SEGMENT
            c.storeBytes(of: UInt16(g.lens[Int(g.iovStarts[m])]), toByteOffset: 16, as: UInt16.self)
            g.controlLens[m] += 24
        }
        _ = xfrm_send_gso_batch(g.fd, g.bufs, g.lens, g.iovStarts, g.iovCounts, g.names, g.namelen, g.control,
                                g.controlLens, Group.controlSize, UInt32(g.count), g.refused)
        var sent: UInt64 = 0
        var failed: UInt64 = 0
        var gsoSends: UInt64 = 0
        var gsoSegments: UInt64 = 0
        for m in 0..<g.count {
            let segments = Int(g.iovCounts[m])
            if g.refused[m] == 0 {
                sent += UInt64(segments)
                if segments > 1 {
                    gsoSends += 1
                    gsoSegments += UInt64(segments)
                }
                continue
            }
            guard segments > 1 else {
                failed += 1
                continue
            }
            // The fallback: each datagram alone, with the same name and control messages less UDP_SEGMENT.
            self.counters.udpGSOFallbacks.wrappingAdd(1, ordering: .relaxed)
            if g.refused[m] == EIO { g.gso = false }
            g.controlLens[m] -= 24
            var one: UInt32 = 1
            var refused: Int32 = 0
            for k in 0..<segments {
                var start = g.iovStarts[m] + UInt32(k)
                let ok = xfrm_send_gso_batch(g.fd, g.bufs, g.lens, &start, &one, g.names + m, g.namelen,
                                             g.control + m * Group.controlSize, g.controlLens + m, Group.controlSize,
                                             1, &refused)
                if ok == 1 { sent += 1 } else { failed += 1 }
            }
        }
        self.counters.wireSent.wrappingAdd(sent, ordering: .relaxed)
        self.counters.sendErrors.wrappingAdd(failed, ordering: .relaxed)
        if gsoSends > 0 {
            self.counters.udpGSOSends.wrappingAdd(gsoSends, ordering: .relaxed)
            self.counters.udpGSOSegments.wrappingAdd(gsoSegments, ordering: .relaxed)
        }
        g.count = 0
        g.iovCount = 0
    }

    /// The group for the next packet. A packet for another group than the one before first sends what every group
    /// holds, so that datagrams leave in the order the stack made them: a fragmented packet (frag4) must not overtake
    /// or be overtaken by its SA's whole ones (raw4, udp4), which the peer's replay window would hold against them.
    /// In steady traffic every packet goes to one group and this sends nothing early.
    @inline(__always)
    private func use(_ index: Int) -> Group {
        if index != self.current {
            if self.current >= 0 { for g in self.groups where g.count > 0 { self.flush(g) } }
            self.current = index
        }
        return self.groups[index]
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
            let fragment = p.loadBE16(at: 6)
            if fragment & (IPv4Header.flagMF | IPv4Header.fragmentOffsetMask) != 0 {
                // A fragment the stack cut (only a sealed packet is cut): what its whole packet would be refused for,
                // it is refused for — raw ESP without the raw socket (--no-raw-esp), ESP in UDP whose first fragment
                // is not from our port or carries the non-ESP marker — and so are the rest of that packet's.
                let key = (source: p.load(fromByteOffset: 12, as: UInt32.self), id: p.loadBE16(at: 4))
                if fragment & IPv4Header.fragmentOffsetMask == 0 {
                    let ok = proto == UInt8(IPPROTO_ESP) ? self.sockets.raw4 >= 0
                        : proto == UInt8(IPPROTO_UDP) && count >= ihl + 12 && p.loadBE16(at: ihl) == self.sockets.udpPort
                            && p.loadBE32(at: ihl + 8) != 0
                    self.refusedFragments = ok ? nil : key
                    if !ok { return false }
                } else if let r = self.refusedFragments, r.source == key.source && r.id == key.id {
                    return false
                }
                guard proto == UInt8(IPPROTO_UDP) || (proto == UInt8(IPPROTO_ESP) && self.sockets.raw4 >= 0) else {
                    return false
                }
                let g = self.use(Self.frag4)
                guard g.fd >= 0 else {
                    self.counters.sendErrors.wrappingAdd(1, ordering: .relaxed)
                    return true  // released with the sent ones
                }
                self.name4(g, p.load(fromByteOffset: 16, as: UInt32.self), port: 0)
                g.controlLens[g.count] = 0
                g.bufs[g.iovCount] = p
                g.lens[g.iovCount] = count
                g.commit()
                return true
            }
            if proto == UInt8(IPPROTO_ESP), self.sockets.raw4 >= 0 {
                let g = self.use(Self.raw4)
                self.name4(g, p.load(fromByteOffset: 16, as: UInt32.self), port: 0)
                g.controlLens[g.count] = 0  // IP_HDRINCL: the stack's own header, source and TOS included
                g.bufs[g.iovCount] = p
                g.lens[g.iovCount] = count
                g.commit()
                return true
            }
            if proto == UInt8(IPPROTO_UDP), count >= ihl + 12, p.loadBE16(at: ihl) == self.sockets.udpPort,
                p.loadBE32(at: ihl + 8) != 0
            {
                let g = self.use(Self.udp4)
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
                g.bufs[g.iovCount] = p + ihl + 8
                g.lens[g.iovCount] = count - ihl - 8
                g.commit()
                return true
            }
        case 6 where count >= 40:
            let next = p.loadByte(at: 6)
            if next == IPv6Fragmentation.fragmentHeader {
                return self.addFragment6(p, count: count)
            }
            if next == UInt8(IPPROTO_ESP), self.sockets.raw6 >= 0 {
                self.add6(self.use(Self.raw6), p, payload: 40, count: count, port: 0)
                return true
            }
            if next == UInt8(IPPROTO_UDP), count >= 52, p.loadBE16(at: 40) == self.sockets.udpPort,
                p.loadBE32(at: 48) != 0, self.sockets.udp6 >= 0
            {
                self.add6(self.use(Self.udp6), p, payload: 48, count: count, port: p.loadBE16(at: 42))
                return true
            }
        default:
            break
        }
        return false
    }

    /// An IPv6 fragment the stack cut (of a sealed packet, right after the IPv6 header): refused, with the rest of its
    /// packet, for what the whole packet would be refused for (as IPv4's); sent as built on the IPPROTO_RAW socket.
    private func addFragment6(_ p: UnsafeMutableRawPointer, count: Int) -> Bool {
        guard count >= 48 else { return false }
        let proto = p.loadByte(at: 40)
        let id = p.loadBE32(at: 44)
        if p.loadBE16(at: 42) & 0xfff8 == 0 {
            let ok = proto == UInt8(IPPROTO_ESP) ? self.sockets.raw6 >= 0
                : proto == UInt8(IPPROTO_UDP) && self.sockets.udp6 >= 0 && count >= 60
                    && p.loadBE16(at: 48) == self.sockets.udpPort && p.loadBE32(at: 56) != 0
            self.refusedFragments6 = ok ? nil : id
            if !ok { return false }
        } else if self.refusedFragments6 == id {
            return false
        }
        let socket = proto == UInt8(IPPROTO_UDP) ? self.sockets.udp6
            : proto == UInt8(IPPROTO_ESP) ? self.sockets.raw6 : -1
        guard socket >= 0 else { return false }  // as its whole packet would be
        let g = self.use(Self.frag6)
        guard g.fd >= 0 else {
            self.counters.sendErrors.wrappingAdd(1, ordering: .relaxed)
            return true  // released with the sent ones
        }
        let i = g.count
        g.names[i] = sockaddr_in6()
        g.names[i].sin6_family = sa_family_t(AF_INET6)
        withUnsafeMutableBytes(of: &g.names[i].sin6_addr) {
            $0.copyMemory(from: UnsafeRawBufferPointer(start: p + 24, count: 16))
        }
        g.controlLens[i] = 0
        g.bufs[g.iovCount] = p
        g.lens[g.iovCount] = count
        g.commit()
        return true
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
        g.controlLens[i] = 64
        g.bufs[g.iovCount] = p + payload
        g.lens[g.iovCount] = count - payload
        g.commit()
    }
}
