// The daemon's packet intake without descriptors, for the fuzz harness (Fuzz/Sources/fuzz-daemon-intake): what an
// intake thread does with a read once it is in memory, through the daemon's own code —
//
//   TUN read (virtio-net header + packet or TSO/USO superpacket) → TUNSource cuts it → batch ┐
//   outer datagram (UDP 4500 payload or raw ESP, IPv4/IPv6; a UDP_GRO read cut by its        ├→ Dispatcher (.daemon
//     segment size) → framed as the IP packet it arrived in (OuterSource.frame)               ┘   rules): the stack,
//   then the wire sink (the caller's), the TUN sink (the daemon's, writing to `tunFD`), IKE (counted and dropped).
//
// Only what the kernel would have handed over is made here: the datagram's source address and port and the
// destination the kernel reports in IP_PKTINFO / IPV6_PKTINFO.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import XFRMCore
import XFRMEngine
import XFRMPacket

public final class DaemonIntake {
    /// An outer socket's kind (the daemon's `Framing`).
    public enum Socket: CaseIterable, Sendable { case udp4, raw4, udp6, raw6 }

    public let counters = DatapathCounters()
    public let pool: PacketPool
    private let tun: TUNSource
    private let dispatcher: Dispatcher
    private let ifindex: Int32
    private let udpPort: UInt16
    private var batch = PacketBatch(capacity: Dispatcher.maximumBatch)
    private let control = UnsafeMutablePointer<UInt8>.allocate(capacity: OuterSource.controlSize)

    /// - Parameters: `wanIfindex` is the stack's outer interface, whose sink is `wire`; `tunFD` takes what the TUN
    ///   sink writes (with the virtio-net header and coalescing, as on a TUN opened with offloads and USO).
    public init(stack: XFRMStack, wanIfindex: Int32, wire: any PacketSink, tunFD: Int32, udpPort: UInt16 = 4500,
                pool: PacketPool) {
        self.pool = pool
        self.ifindex = wanIfindex
        self.udpPort = udpPort
        let engine = self.counters.engine
        self.tun = TUNSource(fd: -1, pool: pool, counters: self.counters, engine: engine, offload: true)
        let sinks = InterfaceSinks()
        sinks.set(wire, ifindex: wanIfindex)
        self.dispatcher = Dispatcher(
            stack: stack, pool: pool, rules: .daemon, counters: engine, interfaces: sinks,
            local: TUNSink(fd: tunFD, pool: pool, counters: self.counters, offload: true, uso: true))
    }

    deinit { self.control.deallocate() }

    /// The largest TUN read (virtio-net header and 64 KB).
    public static var maximumTUNRead: Int { TUNSource.readSize }

    /// One read from the TUN device: cut, and every batch of it run (a superpacket may fill several).
    public func tunRead(_ bytes: UnsafeRawBufferPointer) {
        self.tun.take(UnsafeRawBufferPointer(rebasing: bytes.prefix(TUNSource.readSize)), into: &self.batch)
        self.dispatcher.run(&self.batch)
        while self.tun.hasPending {
            let more = self.tun.resume(into: &self.batch)
            self.dispatcher.run(&self.batch)
            if !more { break }  // the pool ran dry: the daemon would retry; the harness moves on
        }
    }

    /// One receive on an outer socket from `source` (port `sourcePort` for UDP) to `destination`. With `groSize`,
    /// a UDP_GRO read: `payload` holds datagrams of that size (the last may be shorter), cut apart first.
    public func datagram(_ payload: UnsafeRawBufferPointer, socket: Socket, source: IPAddress, sourcePort: UInt16,
                         destination: IPAddress, groSize: Int? = nil) {
        let framing: Framing = switch socket {
        case .udp4: .udp4
        case .raw4: .raw4
        case .udp6: .udp6
        case .raw6: .raw6
        }
        var from = sockaddr_in6()
        withUnsafeMutableBytes(of: &from) { raw in
            raw.initializeMemory(as: UInt8.self, repeating: 0)
            if case .v4(let a) = source {
                raw.storeBytes(of: sa_family_t(AF_INET), toByteOffset: 0, as: sa_family_t.self)
                raw.storeBytes(of: sourcePort.bigEndian, toByteOffset: 2, as: UInt16.self)
                raw.storeBytes(of: a.bigEndian, toByteOffset: 4, as: UInt32.self)
            } else {
                raw.storeBytes(of: sa_family_t(AF_INET6), toByteOffset: 0, as: sa_family_t.self)
                raw.storeBytes(of: sourcePort.bigEndian, toByteOffset: 2, as: UInt16.self)
                source.store(to: raw.baseAddress!, at: 8)
            }
        }
        self.writePktinfo(destination)
        let size = max(groSize ?? payload.count, 1)
        var offset = 0
        repeat {
            let n = min(size, payload.count - offset)
            guard let buf = self.pool.allocate() else { break }
            OuterGROSource.take(UnsafeRawBufferPointer(rebasing: payload[offset..<(offset + n)]), in: buf, from: from,
                                control: self.control, framing: framing, udpPort: self.udpPort, ifindex: self.ifindex,
                                pool: self.pool, counters: self.counters, into: &self.batch)
            offset += n
            if self.batch.isFull { self.dispatcher.run(&self.batch) }
        } while offset < payload.count
        self.dispatcher.run(&self.batch)
    }

    /// The control message the kernel gives a socket with IP_PKTINFO / IPV6_RECVPKTINFO: the destination.
    private func writePktinfo(_ destination: IPAddress) {
        let c = UnsafeMutableRawPointer(self.control)
        c.initializeMemory(as: UInt8.self, repeating: 0, count: OuterSource.controlSize)
        if case .v4(let a) = destination {
            c.storeBytes(of: 28, toByteOffset: 0, as: Int.self)  // cmsghdr + in_pktinfo
            c.storeBytes(of: Int32(IPPROTO_IP), toByteOffset: 8, as: Int32.self)
            c.storeBytes(of: Int32(IP_PKTINFO), toByteOffset: 12, as: Int32.self)
            c.storeBytes(of: a.bigEndian, toByteOffset: 24, as: UInt32.self)  // ipi_addr
        } else {
            c.storeBytes(of: 36, toByteOffset: 0, as: Int.self)  // cmsghdr + in6_pktinfo
            c.storeBytes(of: Int32(IPPROTO_IPV6), toByteOffset: 8, as: Int32.self)
            c.storeBytes(of: Sockopt.ipv6Pktinfo, toByteOffset: 12, as: Int32.self)
            destination.store(to: c, at: 16)
        }
    }
}
