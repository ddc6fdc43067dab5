// The daemon's data path, this stage: one thread, sequential; IPv4 and IPv6 outer (raw ESP and ESP-in-UDP), any
// inner family.
//
//   TUN read → XFRMStack.output → the ESP packet leaves through the raw ESP socket (IP_HDRINCL, the stack's outer
//   header as built) or, for a NAT-T SA, the UDP socket (the ESP after the UDP header, to the SA's port); a packet
//   that no policy protected has nowhere to go: dropped and counted (`tunNoPolicy`).
//   raw ESP / UDP read → XFRMStack.input (what the socket gives without its headers — UDP datagrams, IPv6 raw
//   payloads — framed again as the IP packet it arrived in, so the stack's demux sees what the kernel's would) → delivered or forwarded inner packets are written into the TUN; IKE and keepalives
//   on the UDP port are counted and dropped (no key-manager port yet).
//
// The stack's network model has one interface, "wan", holding the host's addresses (read with getifaddrs and
// refreshed every second) with default routes: outer packets leave through the host's IP stack.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import Logging
import Synchronization
import XFRMCore
import XFRMPacket

/// Counters of what the data path did with packets outside the stack's own xfrm_stat counters.
public final class DatapathCounters: Sendable {
    public let tunRead = Atomic<UInt64>(0)
    public let tunWritten = Atomic<UInt64>(0)
    /// Read from the TUN but not protected by any policy: dropped (it has nowhere else to go).
    public let tunNoPolicy = Atomic<UInt64>(0)
    public let wireSent = Atomic<UInt64>(0)
    public let wireReceived = Atomic<UInt64>(0)
    /// IKE (non-ESP marker) and NAT-T keepalives on the UDP port: counted and dropped.
    public let ikeDropped = Atomic<UInt64>(0)
    public let sendErrors = Atomic<UInt64>(0)
    public let noBuffer = Atomic<UInt64>(0)
    /// Arrived on an outer socket without being ESP for one of our SAs: never written into the TUN.
    public let notESP = Atomic<UInt64>(0)
    /// Outer datagrams larger than the receive buffer (truncated by the kernel): dropped.
    public let truncated = Atomic<UInt64>(0)
    init() {}

    /// Every counter by its metric label.
    public var snapshot: [String: UInt64] {
        ["tun_read": self.tunRead.load(ordering: .relaxed), "tun_written": self.tunWritten.load(ordering: .relaxed),
         "tun_no_policy": self.tunNoPolicy.load(ordering: .relaxed), "wire_sent": self.wireSent.load(ordering: .relaxed),
         "wire_received": self.wireReceived.load(ordering: .relaxed),
         "ike_dropped": self.ikeDropped.load(ordering: .relaxed), "send_errors": self.sendErrors.load(ordering: .relaxed),
         "no_buffer": self.noBuffer.load(ordering: .relaxed), "not_esp": self.notESP.load(ordering: .relaxed),
         "truncated": self.truncated.load(ordering: .relaxed)]
    }
}

public final class Datapath: @unchecked Sendable {
    public let tunName: String
    public let counters = DatapathCounters()
    private let stack: XFRMStack
    private let logger: Logger
    private let pool = PacketPool(count: 256, slotSize: 4096, headroom: 256)
    /// Free packet buffers (a queue-depth view for the metrics).
    public var poolFree: Int { self.pool.available }
    private let tunFD: Int32
    private let rawFD: Int32
    private let udpFD: Int32
    private let raw6FD: Int32
    private let udp6FD: Int32
    private let udpPort: UInt16
    private let wanIfindex: Int32
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t? = nil
    /// Set when the data path had to stop on its own (its TUN device went away): the daemon exits with an error.
    public let failed = Atomic<Bool>(false)

    /// Opens the TUN device and the outer sockets and prepares the stack's network model. Throws one clear error
    /// (missing privileges, no /dev/net/tun, port in use).
    public init(stack: XFRMStack, tunName: String, udpPort: UInt16, rawESP: Bool, logger: Logger)
        throws(SocketError)
    {
        self.stack = stack
        self.logger = logger
        self.udpPort = udpPort
        var name = [CChar](repeating: 0, count: 17)
        let fd = xfrm_tun_open(tunName, &name)
        guard fd >= 0 else { throw SocketError("cannot open TUN device \(tunName) (/dev/net/tun)", errno: -fd) }
        self.tunFD = fd
        self.tunName = String(cString: name)
        let up = xfrm_link_up(self.tunName)
        guard up == 0 else {
            close(fd)
            throw SocketError("cannot bring \(self.tunName) up", errno: -up)
        }
        var raw: Int32 = -1
        if rawESP {
            raw = socket(AF_INET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_ESP))
            guard raw >= 0 else {
                let e = errno
                close(fd)
                throw SocketError("cannot open the raw ESP socket", errno: e)
            }
            var one: Int32 = 1
            _ = setsockopt(raw, Int32(IPPROTO_IP), IP_HDRINCL, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        let udp = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard udp >= 0 else {
            let e = errno
            close(fd)
            if raw >= 0 { close(raw) }
            throw SocketError("cannot open the UDP socket", errno: e)
        }
        var one: Int32 = 1
        _ = setsockopt(udp, Int32(IPPROTO_IP), IP_PKTINFO, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = udpPort.bigEndian
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(udp, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard udp >= 0, bound == 0 else {
            let e = errno
            close(fd)
            if raw >= 0 { close(raw) }
            if udp >= 0 { close(udp) }
            throw SocketError("cannot bind UDP port \(udpPort)", errno: e)
        }
        // Room for bursts: the data path reads in batches of 64, and a full receive queue drops silently.
        var bufferSize: Int32 = 4 << 20
        for fd in [raw, udp] where fd >= 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufferSize, socklen_t(MemoryLayout<Int32>.size))
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufferSize, socklen_t(MemoryLayout<Int32>.size))
        }
        self.rawFD = raw
        self.udpFD = udp
        // IPv6: the same two sockets, without IP_HDRINCL (the kernel writes the IPv6 header from our addresses).
        var raw6: Int32 = -1
        if rawESP {
            raw6 = socket(AF_INET6, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_ESP))
        }
        let udp6 = socket(AF_INET6, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        for fd in [raw6, udp6] where fd >= 0 {
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), Sockopt.ipv6RecvPktinfo, &one, socklen_t(MemoryLayout<Int32>.size))
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), Sockopt.ipv6V6only, &one, socklen_t(MemoryLayout<Int32>.size))
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufferSize, socklen_t(MemoryLayout<Int32>.size))
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufferSize, socklen_t(MemoryLayout<Int32>.size))
        }
        var addr6 = sockaddr_in6()
        addr6.sin6_family = sa_family_t(AF_INET6)
        addr6.sin6_port = udpPort.bigEndian
        let bound6 = udp6 >= 0 && withUnsafePointer(to: &addr6) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(udp6, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        } == 0
        if !bound6 && udp6 >= 0 { close(udp6) }
        // A host without IPv6 keeps working on IPv4 (the IPv6 sockets stay closed; sends through them are errors).
        self.raw6FD = raw6
        self.udp6FD = bound6 ? udp6 : -1

        let net = stack.network
        do throws(NetworkError) {
            let wan = try net.addInterface(name: "wan", kind: "dummy")
            try net.modify(name: "wan") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
            try net.addRoute(IPPrefix("0.0.0.0/0")!, device: "wan", via: nil)
            try net.addRoute(IPPrefix("::/0")!, device: "wan", via: nil)
            self.wanIfindex = wan.index
        } catch {
            for f in [fd, raw, udp, self.raw6FD, self.udp6FD] where f >= 0 { close(f) }
            throw SocketError("cannot set up the network model: \(error.message)", errno: EINVAL)
        }
        stack.nattPort.store(udpPort, ordering: .relaxed)
        self.refreshAddresses()
    }

    deinit {
        for fd in [self.tunFD, self.rawFD, self.udpFD, self.raw6FD, self.udp6FD] where fd >= 0 { close(fd) }
    }

    /// Runs the loop on its own thread.
    public func start() {
        let context = Unmanaged.passRetained(self).toOpaque()
        var id = pthread_t()
        let rc = pthread_create(&id, nil, { arg in
            let datapath = Unmanaged<Datapath>.fromOpaque(arg!).takeRetainedValue()
            datapath.loop()
            return nil
        }, context)
        if rc == 0 { self.thread = id } else { Unmanaged<Datapath>.fromOpaque(context).release() }
    }

    /// Stops the loop and waits for its thread.
    public func stop() {
        self.stopping.store(true, ordering: .relaxed)
        if let id = self.thread { pthread_join(id, nil) }
        self.thread = nil
    }

    // MARK: - The loop

    private func loop() {
        var lastRefresh: UInt64 = 0
        var fds = [pollfd(fd: self.tunFD, events: Int16(POLLIN), revents: 0)]
        // The outer sockets, each with how its datagrams are framed for the stack.
        var outer: [(Int32, Framing)] = [(self.udpFD, .udp4)]
        if self.rawFD >= 0 { outer.append((self.rawFD, .raw4)) }
        if self.udp6FD >= 0 { outer.append((self.udp6FD, .udp6)) }
        if self.raw6FD >= 0 { outer.append((self.raw6FD, .raw6)) }
        for (fd, _) in outer { fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0)) }
        while !self.stopping.load(ordering: .relaxed) {
            for i in fds.indices { fds[i].revents = 0 }
            let n = poll(&fds, nfds_t(fds.count), 200)
            if n > 0 {
                if fds[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
                    self.logger.error("the TUN device \(self.tunName) went away; the data path stops")
                    self.failed.store(true, ordering: .relaxed)
                    return
                }
                if fds[0].revents & Int16(POLLIN) != 0 { self.drainTUN() }
                for (i, (fd, framing)) in outer.enumerated() where fds[i + 1].revents & Int16(POLLIN) != 0 {
                    self.drainOuter(fd, framing)
                }
            }
            let now = self.stack.clock.now
            if now != lastRefresh {
                lastRefresh = now
                self.refreshAddresses()
            }
        }
    }

    /// Up to 64 packets per readiness event (the descriptors are non-blocking).
    private func drainTUN() {
        for _ in 0..<64 {
            guard var buf = self.pool.allocate() else {
                self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
                return
            }
            let room = 2048
            let p = buf.append(room)
            let n = read(self.tunFD, p, room)
            guard n > 0 else {
                self.pool.release(buf)
                return
            }
            buf.trimBack(room - n)
            self.counters.tunRead.wrappingAdd(1, ordering: .relaxed)
            self.output(&buf)
        }
    }

    private func output(_ buf: inout PacketBuffer) {
        defer { self.pool.release(buf) }
        var transformed = false
        switch self.stack.output(&buf, transformed: &transformed) {
        case .transmit where transformed:
            self.sendToWire(buf)
        case .transmit:
            // No SA touched it (no policy, a bypass policy, optional templates only): the outer side carries ESP
            // and nothing else, so it has nowhere to go.
            self.counters.tunNoPolicy.wrappingAdd(1, ordering: .relaxed)
        case .icmpError:
            self.writeTUN(buf)  // the error goes back to the inner sender
        case .offload, .dropped:
            break
        }
    }

    /// Sends what the stack protected; anything else read from the TUN had no policy and is dropped.
    private func sendToWire(_ buf: PacketBuffer) {
        let p = buf.data
        let version = buf.count >= 20 ? p.loadByte(at: 0) >> 4 : 0
        let sent: Int
        if version == 4 {
            let proto = p.loadByte(at: 9)
            let ihl = Int(p.loadByte(at: 0) & 0x0f) * 4
            var dst = sockaddr_in()
            dst.sin_family = sa_family_t(AF_INET)
            dst.sin_addr.s_addr = p.load(fromByteOffset: 16, as: UInt32.self)  // already network order
            if proto == UInt8(IPPROTO_ESP), self.rawFD >= 0 {
                sent = withUnsafePointer(to: &dst) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(self.rawFD, p, buf.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
            } else if proto == UInt8(IPPROTO_UDP), buf.count >= ihl + 12, p.loadBE16(at: ihl) == self.udpPort,
                p.loadBE32(at: ihl + 8) != 0
            {
                dst.sin_port = p.loadBE16(at: ihl + 2).bigEndian
                sent = withUnsafePointer(to: &dst) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(self.udpFD, p + ihl + 8, buf.count - ihl - 8, 0, $0,
                               socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
            } else {
                self.counters.tunNoPolicy.wrappingAdd(1, ordering: .relaxed)
                return
            }
        } else if version == 6 && buf.count >= 40 {
            // The kernel writes the IPv6 header: it gets the payload, the destination and our source (pktinfo).
            let next = p.loadByte(at: 6)
            var dst = sockaddr_in6()
            dst.sin6_family = sa_family_t(AF_INET6)
            withUnsafeMutableBytes(of: &dst.sin6_addr) {
                $0.copyMemory(from: UnsafeRawBufferPointer(start: p + 24, count: 16))
            }
            if next == UInt8(IPPROTO_ESP), self.raw6FD >= 0 {
                sent = self.send6(self.raw6FD, p + 40, buf.count - 40, to: &dst, from: p + 8)
            } else if next == UInt8(IPPROTO_UDP), buf.count >= 52, p.loadBE16(at: 40) == self.udpPort,
                p.loadBE32(at: 48) != 0, self.udp6FD >= 0
            {
                dst.sin6_port = p.loadBE16(at: 42).bigEndian
                sent = self.send6(self.udp6FD, p + 48, buf.count - 48, to: &dst, from: p + 8)
            } else {
                self.counters.tunNoPolicy.wrappingAdd(1, ordering: .relaxed)
                return
            }
        } else {
            self.counters.tunNoPolicy.wrappingAdd(1, ordering: .relaxed)
            return
        }
        if sent < 0 {
            self.counters.sendErrors.wrappingAdd(1, ordering: .relaxed)
        } else {
            self.counters.wireSent.wrappingAdd(1, ordering: .relaxed)
        }
    }

    /// sendmsg with IPV6_PKTINFO naming the source address (16 bytes at `source`).
    private func send6(_ fd: Int32, _ payload: UnsafeMutableRawPointer, _ count: Int, to dst: inout sockaddr_in6,
                       from source: UnsafeMutableRawPointer) -> Int {
        var control = [UInt8](repeating: 0, count: 40)  // CMSG_SPACE(sizeof(struct in6_pktinfo))
        control.withUnsafeMutableBytes { c in
            c.storeBytes(of: 36, toByteOffset: 0, as: Int.self)  // CMSG_LEN(20)
            c.storeBytes(of: Int32(IPPROTO_IPV6), toByteOffset: 8, as: Int32.self)
            c.storeBytes(of: Sockopt.ipv6Pktinfo, toByteOffset: 12, as: Int32.self)
            c.baseAddress!.advanced(by: 16).copyMemory(from: source, byteCount: 16)
        }
        var iov = iovec(iov_base: payload, iov_len: count)
        return withUnsafeMutablePointer(to: &dst) { d in
            control.withUnsafeMutableBytes { c in
                withUnsafeMutablePointer(to: &iov) { v in
                    var msg = msghdr()
                    msg.msg_name = UnsafeMutableRawPointer(d)
                    msg.msg_namelen = socklen_t(MemoryLayout<sockaddr_in6>.size)
                    msg.msg_iov = v
                    msg.msg_iovlen = 1
                    msg.msg_control = c.baseAddress
                    msg.msg_controllen = c.count
                    return sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
                }
            }
        }
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

    /// Up to 64 datagrams of one outer socket: framed as IP packets and given to the input path.
    private func drainOuter(_ fd: Int32, _ framing: Framing) {
        var control = [UInt8](repeating: 0, count: 128)  // one per drain, cleared per datagram
        for _ in 0..<64 {
            guard var buf = self.pool.allocate() else {
                self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
                return
            }
            let room = 3584  // the slot less headroom and the headers we prepend
            let payload = buf.append(room)
            var from = sockaddr_in6()  // large enough for either family
            control.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0) }
            var iov = iovec(iov_base: payload, iov_len: room)
            let n: Int = withUnsafeMutablePointer(to: &from) { fromPtr in
                control.withUnsafeMutableBytes { ctl in
                    withUnsafeMutablePointer(to: &iov) { iovPtr in
                        var msg = msghdr()
                        msg.msg_name = UnsafeMutableRawPointer(fromPtr)
                        msg.msg_namelen = socklen_t(MemoryLayout<sockaddr_in6>.size)
                        msg.msg_iov = iovPtr
                        msg.msg_iovlen = 1
                        msg.msg_control = ctl.baseAddress
                        msg.msg_controllen = ctl.count
                        return recvmsg(fd, &msg, Int32(MSG_DONTWAIT))
                    }
                }
            }
            guard n >= 0 else {
                self.pool.release(buf)
                return
            }
            if n > room - 1 {  // as long as the buffer: assume truncated rather than decrypt half a packet
                self.counters.truncated.wrappingAdd(1, ordering: .relaxed)
                self.pool.release(buf)
                continue
            }
            buf.trimBack(room - n)
            let local = Self.pktinfoAddress(control)
            switch framing {
            case .raw4:
                break
            case .udp4:
                guard case .v4(let dst)? = local else {
                    self.pool.release(buf)
                    continue
                }
                let sin = withUnsafeBytes(of: from) { $0.load(as: sockaddr_in.self) }
                let ip = buf.prepend(28)
                IPv4Header.write(ip, tos: 0, totalLength: buf.count, identification: 0, flags: 0, ttl: 64,
                                 proto: UInt8(IPPROTO_UDP), source: UInt32(bigEndian: sin.sin_addr.s_addr),
                                 destination: dst)
                Self.writeUDP(ip + 20, sport: UInt16(bigEndian: sin.sin_port), dport: self.udpPort, length: 8 + n)
            case .raw6, .udp6:
                guard let dst = local, dst.version == 6 else {
                    self.pool.release(buf)
                    continue
                }
                var sourceBytes = from.sin6_addr
                let src = withUnsafeMutableBytes(of: &sourceBytes) { IPAddress.loadV6(from: $0.baseAddress!, at: 0) }
                let udp = framing == .udp6
                let ip = buf.prepend(udp ? 48 : 40)
                IPv6Header.write(ip, trafficClass: 0, flowLabel: 0, payloadLength: buf.count - 40,
                                 nextHeader: udp ? UInt8(IPPROTO_UDP) : UInt8(IPPROTO_ESP), hopLimit: 64, source: src,
                                 destination: dst)
                if udp {
                    Self.writeUDP(ip + 40, sport: UInt16(bigEndian: from.sin6_port), dport: self.udpPort,
                                  length: 8 + n)
                }
            }
            self.counters.wireReceived.wrappingAdd(1, ordering: .relaxed)
            self.input(&buf)
        }
    }

    /// A UDP header (checksum 0: the socket already checked the datagram).
    private static func writeUDP(_ p: UnsafeMutableRawPointer, sport: UInt16, dport: UInt16, length: Int) {
        p.storeBE16(sport, at: 0)
        p.storeBE16(dport, at: 2)
        p.storeBE16(UInt16(truncatingIfNeeded: length), at: 4)
        p.storeBE16(0, at: 6)
    }

    /// The destination address from an IP_PKTINFO or IPV6_PKTINFO control message.
    private static func pktinfoAddress(_ control: [UInt8]) -> IPAddress? {
        control.withUnsafeBytes { c -> IPAddress? in
            let length = c.load(fromByteOffset: 0, as: Int.self)
            let level = c.load(fromByteOffset: 8, as: Int32.self)
            let type = c.load(fromByteOffset: 12, as: Int32.self)
            if level == Int32(IPPROTO_IP) && type == Int32(IP_PKTINFO) && length >= 28 {
                return .v4(UInt32(bigEndian: c.load(fromByteOffset: 24, as: UInt32.self)))
            }
            if level == Int32(IPPROTO_IPV6) && type == Sockopt.ipv6Pktinfo && length >= 36 {
                return IPAddress.loadV6(from: UnsafeMutableRawPointer(mutating: c.baseAddress!), at: 16)
            }
            return nil
        }
    }

    private func input(_ buf: inout PacketBuffer) {
        defer { self.pool.release(buf) }
        var decapsulated = false
        switch self.stack.input(&buf, ifindex: self.wanIfindex, decapsulated: &decapsulated) {
        case .deliver where decapsulated, .forward where decapsulated:
            self.writeTUN(buf)
        case .deliver, .forward:
            // Accepted by the policy check but never inside ESP (plaintext, a broadcast, our own port): the inner
            // side gets only what ESP protected.
            self.counters.notESP.wrappingAdd(1, ordering: .relaxed)
        case .ike:
            self.counters.ikeDropped.wrappingAdd(1, ordering: .relaxed)
        case .dropped:
            break
        }
    }

    private func writeTUN(_ buf: PacketBuffer) {
        if write(self.tunFD, buf.data, buf.count) == buf.count {
            self.counters.tunWritten.wrappingAdd(1, ordering: .relaxed)
        } else {
            self.counters.sendErrors.wrappingAdd(1, ordering: .relaxed)
        }
    }

    // MARK: - Host addresses

    /// Puts the host's current addresses on "wan", so ESP for them counts as local (≈ the kernel's local routes).
    private func refreshAddresses() {
        var list: UnsafeMutablePointer<ifaddrs>? = nil
        guard getifaddrs(&list) == 0 else { return }
        defer { freeifaddrs(list) }
        let known = Set(self.stack.network.interface(named: "wan")?.addresses.map(\.address) ?? [])
        var cursor = list
        while let ifa = cursor {
            defer { cursor = ifa.pointee.ifa_next }
            guard let sa = ifa.pointee.ifa_addr else { continue }
            var address: IPAddress? = nil
            if Int32(sa.pointee.sa_family) == AF_INET {
                let a = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr.s_addr }
                address = .v4(UInt32(bigEndian: a))
            } else if Int32(sa.pointee.sa_family) == AF_INET6 {
                let bytes = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { p in
                    withUnsafeBytes(of: p.pointee.sin6_addr) { Array($0) }
                }
                let hi = bytes[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                let lo = bytes[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                address = .v6(hi, lo)
            }
            guard let address, !known.contains(address) else { continue }
            let full: UInt8 = address.version == 4 ? 32 : 128
            try? self.stack.network.addAddress(IPPrefix(address, length: full), device: "wan")
        }
    }
}

/// Socket option numbers Glibc does not export to Swift (linux/in6.h).
enum Sockopt {
    static let ipv6V6only: Int32 = 26
    static let ipv6RecvPktinfo: Int32 = 49
    static let ipv6Pktinfo: Int32 = 50
}
