#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import XFRMCore
import XFRMEngine
import XFRMPacket

/// The outer side's descriptors: raw ESP (IP protocol 50) and ESP in UDP (the NAT-T port), IPv4 and IPv6; each
/// carries the daemon's mark, so that a routing rule can keep the daemon's own ESP out of its TUN.
struct OuterSockets {
    var raw4: Int32 = -1
    var udp4: Int32 = -1
    var raw6: Int32 = -1
    var udp6: Int32 = -1
    /// Send only (IPPROTO_RAW, which implies IP_HDRINCL and receives nothing): IPv4 fragments the stack cut, ESP or
    /// ESP in UDP, go out as built, since a UDP socket cannot send a fragment (-1 without CAP_NET_RAW: then they are
    /// counted in `send_errors`).
    var frag4: Int32 = -1
    /// The same for IPv6 fragments (AF_INET6 IPPROTO_RAW: the packet as built, IPv6 header included).
    var frag6: Int32 = -1
    let udpPort: UInt16
    /// UDP_GRO is on (the kernel may coalesce ESP-in-UDP datagrams; OuterGROSource cuts them again).
    var udp4GRO = false
    var udp6GRO = false

    var all: [Int32] { [self.raw4, self.udp4, self.raw6, self.udp6, self.frag4, self.frag6].filter { $0 >= 0 } }

    /// Opens and binds them. IPv6 is best effort (a host without IPv6 keeps working on IPv4).
    /// `shareUDPPort`: the NAT-T port is shared with a key manager's IKE socket (xfrm_natt_join: SO_REUSEPORT and a
    /// steering program; `xfrmd --share-natt-port`).
    init(udpPort: UInt16, rawESP: Bool, mark: UInt32, gro: Bool = true, shareUDPPort: Bool = false) throws(SocketError) {
        self.udpPort = udpPort
        var one: Int32 = 1
        var bufferSize: Int32 = 4 << 20  // room for bursts: a full receive queue drops silently
        let intSize = socklen_t(MemoryLayout<Int32>.size)
        func fail(_ what: String, _ e: Int32) -> SocketError {
            for fd in self.all { close(fd) }
            return SocketError(what, errno: e)
        }
        if rawESP {
            self.raw4 = socket(AF_INET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_ESP))
            guard self.raw4 >= 0 else { throw fail("cannot open the raw ESP socket", errno) }
            _ = setsockopt(self.raw4, Int32(IPPROTO_IP), IP_HDRINCL, &one, intSize)
        }
        self.udp4 = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard self.udp4 >= 0 else { throw fail("cannot open the UDP socket", errno) }
        _ = setsockopt(self.udp4, Int32(IPPROTO_IP), IP_PKTINFO, &one, intSize)
        // The outer TOS of each datagram (IP_TOS control messages): its ECN field is what RFC 6040 decapsulation
        // reads (a CE mark on the path reaches the inner packet). A GRO read holds datagrams of one TOS only
        // (inet_gro_receive flushes on a different one).
        _ = setsockopt(self.udp4, Int32(IPPROTO_IP), Sockopt.ipRecvTOS, &one, intSize)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = udpPort.bigEndian
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                shareUDPPort ? xfrm_natt_join(self.udp4, $0, UInt32(MemoryLayout<sockaddr_in>.size), nil, XFRM_NATT_ESP)
                    : bind(self.udp4, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0 else { throw fail("cannot bind UDP port \(udpPort)", errno) }
        if rawESP {
            self.raw6 = socket(AF_INET6, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_ESP))
        }
        let udp6 = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        for fd in [self.raw6, udp6] where fd >= 0 {
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), Sockopt.ipv6RecvPktinfo, &one, intSize)
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), Sockopt.ipv6RecvTclass, &one, intSize)  // as IP_RECVTOS above
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), Sockopt.ipv6V6only, &one, intSize)
        }
        var addr6 = sockaddr_in6()
        addr6.sin6_family = sa_family_t(AF_INET6)
        addr6.sin6_port = udpPort.bigEndian
        let bound6 = udp6 >= 0 && withUnsafePointer(to: &addr6) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                shareUDPPort ? xfrm_natt_join(udp6, $0, UInt32(MemoryLayout<sockaddr_in6>.size), nil, XFRM_NATT_ESP)
                    : bind(udp6, $0, socklen_t(MemoryLayout<sockaddr_in6>.size))
            }
        } == 0
        if !bound6 && udp6 >= 0 { close(udp6) }
        self.udp6 = bound6 ? udp6 : -1
        self.frag4 = socket(AF_INET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_RAW))
        self.frag6 = socket(AF_INET6, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_RAW))
        if gro {
            self.udp4GRO = xfrm_set_udp_option(self.udp4, 104, 1) == 0  // UDP_GRO (Linux 5.0 and later)
            self.udp6GRO = self.udp6 >= 0 && xfrm_set_udp_option(self.udp6, 104, 1) == 0
        }
        for fd in self.all {
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufferSize, intSize)
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufferSize, intSize)
            if mark != 0 {
                let rc = xfrm_set_mark(fd, mark)
                guard rc == 0 else { throw fail("cannot set the socket mark \(mark) (SO_MARK)", -rc) }
            }
        }
    }

    func closeAll() { for fd in self.all { close(fd) } }
}

/// The sizes the outer sockets take.
public enum OuterSocketLimits {
    /// The largest outer packet the daemon can receive whole (a packet buffer less its headroom and the headers
    /// framing adds): `xfrmd --outer-mtu` stays at or below it.
    public static let largestDatagram = OuterSource.room
}

/// How an outer socket's datagrams become the IP packets they arrived as.
enum Framing {
    /// IPv4 raw: the datagram is the whole packet.
    case raw4
    /// IPv6 raw: the payload after the IPv6 header.
    case raw6
    /// UDP: the payload after the UDP header.
    case udp4
    case udp6
}

/// One outer socket's reads, up to a batch per recvmmsg(2): each datagram framed again as the IP packet it arrived
/// in (UDP datagrams and IPv6 raw payloads come without their headers), so that the stack's demux sees what the
/// kernel's would. Its arrays are allocated once.
final class OuterSource: PacketSource {
    let fd: Int32
    let framing: Framing
    let udpPort: UInt16
    let ifindex: Int32
    let pool: PacketPool
    let counters: DatapathCounters
    let engine: EngineCounters
    static let room = 3584  // the slot less headroom and the headers we prepend
    /// Room for the destination (IPV6_PKTINFO: CMSG_SPACE(20) = 40), the traffic class (IPV6_TCLASS, an int: 24;
    /// IP_TOS, a byte: 24) and, with GRO, UDP_GRO (an int: 24): 88 at most.
    static let controlSize = 96
    private let n = EngineConstants.batchSize
    private let bufs: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    private let caps: UnsafeMutablePointer<Int>
    private let lens: UnsafeMutablePointer<Int>
    private let flags: UnsafeMutablePointer<Int32>
    private let names: UnsafeMutablePointer<sockaddr_in6>
    private let control: UnsafeMutablePointer<UInt8>
    private var held: [PacketBuffer] = []
    /// The last read filled the batch: more may be waiting.
    private(set) var mayHaveMore = false

    init(fd: Int32, framing: Framing, udpPort: UInt16, ifindex: Int32, pool: PacketPool, counters: DatapathCounters,
         engine: EngineCounters) {
        self.fd = fd
        self.framing = framing
        self.udpPort = udpPort
        self.ifindex = ifindex
        self.pool = pool
        self.counters = counters
        self.engine = engine
        self.bufs = .allocate(capacity: self.n)
        self.caps = .allocate(capacity: self.n)
        self.lens = .allocate(capacity: self.n)
        self.flags = .allocate(capacity: self.n)
        self.names = .allocate(capacity: self.n)
        self.control = .allocate(capacity: self.n * Self.controlSize)
        self.held.reserveCapacity(self.n)
    }

    deinit {
        self.bufs.deallocate()
        self.caps.deallocate()
        self.lens.deallocate()
        self.flags.deallocate()
        self.names.deallocate()
        self.control.deallocate()
    }

    func read(into batch: inout PacketBatch) -> Int {
        let want = min(self.n, batch.capacity - batch.count)
        while self.held.count < want, var b = self.pool.allocate() {
            self.bufs[self.held.count] = b.append(Self.room)
            self.caps[self.held.count] = Self.room
            self.held.append(b)
        }
        if self.held.count < want {
            self.engine.poolExhausted.wrappingAdd(1, ordering: .relaxed)
            self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
        }
        let asked = min(self.held.count, want)
        guard asked > 0 else {
            self.mayHaveMore = false
            return 0
        }
        let got = Int(xfrm_recv_batch(self.fd, self.bufs, self.caps, self.lens, self.flags, self.names, self.control,
                                      Self.controlSize, UInt32(asked)))
        var added = 0
        for i in 0..<max(got, 0) {
            var buf = self.held[i]
            if self.flags[i] & Int32(MSG_TRUNC) != 0 {  // never decrypt half a packet
                self.counters.truncated.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(buf)
                continue
            }
            let len = self.lens[i]
            buf.trimBack(Self.room - len)
            if Self.frame(&buf, length: len, from: self.names[i], control: self.control + i * Self.controlSize,
                          framing: self.framing, udpPort: self.udpPort) {
                batch.append(PacketBatch.Packet(buf, stage: .input, ifindex: self.ifindex))
                added += 1
            } else {
                self.counters.notESP.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(buf)
            }
        }
        // What recvmmsg did not fill stays held for the next read (its payload area is already reserved).
        if got > 0 {
            self.held.removeFirst(got)
            for i in 0..<self.held.count { self.bufs[i] = self.held[i].data }
        }
        self.counters.wireReceived.wrappingAdd(UInt64(added), ordering: .relaxed)
        self.mayHaveMore = got == self.n
        return added
    }

    /// Returns every held buffer to the pool.
    func releaseHeld() {
        for b in self.held { self.pool.release(b) }
        self.held.removeAll()
    }

    /// Frames a datagram (`n` bytes in `buf`) as the IP packet it arrived in, from its source and the destination in
    /// its control messages; false when there is none.
    static func frame(_ buf: inout PacketBuffer, length n: Int, from: sockaddr_in6, control: UnsafeMutablePointer<UInt8>,
                      framing: Framing, udpPort: UInt16) -> Bool {
        switch framing {
        case .raw4:
            return true
        case .udp4:
            guard case .v4(let dst)? = Self.pktinfoAddress(control) else { return false }
            let sin = withUnsafeBytes(of: from) { $0.load(as: sockaddr_in.self) }
            let ip = buf.prepend(28)
            IPv4Header.write(ip, tos: Self.trafficClass(control), totalLength: buf.count, identification: 0, flags: 0,
                             ttl: 64,
                             proto: UInt8(IPPROTO_UDP), source: UInt32(bigEndian: sin.sin_addr.s_addr), destination: dst)
            Self.writeUDP(ip + 20, sport: UInt16(bigEndian: sin.sin_port), dport: udpPort, length: 8 + n)
            return true
        case .raw6, .udp6:
            guard let dst = Self.pktinfoAddress(control), dst.version == 6 else { return false }
            var sourceBytes = from.sin6_addr
            let src = withUnsafeMutableBytes(of: &sourceBytes) { IPAddress.loadV6(from: $0.baseAddress!, at: 0) }
            let udp = framing == .udp6
            let ip = buf.prepend(udp ? 48 : 40)
            IPv6Header.write(ip, trafficClass: Self.trafficClass(control), flowLabel: 0, payloadLength: buf.count - 40,
                             nextHeader: udp ? UInt8(IPPROTO_UDP) : UInt8(IPPROTO_ESP), hopLimit: 64, source: src,
                             destination: dst)
            if udp { Self.writeUDP(ip + 40, sport: UInt16(bigEndian: from.sin6_port), dport: udpPort, length: 8 + n) }
            return true
        }
    }

    /// A UDP header (checksum 0: the socket already checked the datagram).
    private static func writeUDP(_ p: UnsafeMutableRawPointer, sport: UInt16, dport: UInt16, length: Int) {
        p.storeBE16(sport, at: 0)
        p.storeBE16(dport, at: 2)
        p.storeBE16(UInt16(truncatingIfNeeded: length), at: 4)
        p.storeBE16(0, at: 6)
    }

    /// The outer TOS / traffic class the datagram arrived with (an IP_TOS byte or an IPV6_TCLASS int), 0 without one.
    static func trafficClass(_ c: UnsafeMutablePointer<UInt8>) -> UInt8 {
        if let (raw, length) = Self.controlMessage(c, level: Int32(IPPROTO_IP), type: Int32(IP_TOS)), length >= 17 {
            return raw.load(fromByteOffset: 16, as: UInt8.self)
        }
        if let (raw, length) = Self.controlMessage(c, level: Int32(IPPROTO_IPV6), type: Sockopt.ipv6Tclass),
            length >= 20
        {
            return UInt8(truncatingIfNeeded: raw.load(fromByteOffset: 16, as: Int32.self))
        }
        return 0
    }

    /// The destination address from an IP_PKTINFO or IPV6_PKTINFO control message.
    static func pktinfoAddress(_ c: UnsafeMutablePointer<UInt8>) -> IPAddress? {
        guard let (raw, length) = Self.controlMessage(c, level: Int32(IPPROTO_IP), type: Int32(IP_PKTINFO))
            ?? Self.controlMessage(c, level: Int32(IPPROTO_IPV6), type: Sockopt.ipv6Pktinfo)
        else { return nil }
        if raw.load(fromByteOffset: 8, as: Int32.self) == Int32(IPPROTO_IP) {
            return length >= 28 ? .v4(UInt32(bigEndian: raw.load(fromByteOffset: 24, as: UInt32.self))) : nil
        }
        return length >= 36 ? IPAddress.loadV6(from: raw, at: 16) : nil
    }

    /// The control message of `level` and `type` in a zeroed area of `controlSize` bytes, and its length
    /// (≈ CMSG_FIRSTHDR/CMSG_NXTHDR: each header is a size_t length and two ints, aligned to 8 bytes).
    static func controlMessage(_ c: UnsafeMutablePointer<UInt8>, level: Int32, type: Int32)
        -> (UnsafeMutableRawPointer, Int)? {
        let raw = UnsafeMutableRawPointer(c)
        var offset = 0
        while offset + 16 <= Self.controlSize {
            let length = raw.load(fromByteOffset: offset, as: Int.self)
            guard length >= 16, offset + length <= Self.controlSize else { return nil }
            if raw.load(fromByteOffset: offset + 8, as: Int32.self) == level
                && raw.load(fromByteOffset: offset + 12, as: Int32.self) == type {
                return (raw + offset, length)
            }
            offset += (length + 7) & ~7
        }
        return nil
    }
}

/// Socket option numbers Glibc does not export to Swift (linux/in6.h).
enum Sockopt {
    static let ipv6V6only: Int32 = 26
    static let ipv6RecvPktinfo: Int32 = 49
    static let ipv6Pktinfo: Int32 = 50
    static let ipv6Tclass: Int32 = 67
    static let ipv6RecvTclass: Int32 = 66
    static let ipRecvTOS: Int32 = 13
}
