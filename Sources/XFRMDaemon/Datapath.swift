// The daemon's data path, this stage: one thread, sequential, IPv4 outer (raw ESP and ESP-in-UDP), any inner family.
//
//   TUN read → XFRMStack.output → the ESP packet leaves through the raw ESP socket (IP_HDRINCL, the stack's outer
//   header as built) or, for a NAT-T SA, the UDP socket (the ESP after the UDP header, to the SA's port); a packet
//   that no policy protected has nowhere to go: dropped and counted (`tunNoPolicy`).
//   raw ESP / UDP read → XFRMStack.input (the UDP datagram framed again as IPv4/UDP so the stack's NAT-T demux sees
//   what the kernel's would) → delivered or forwarded inner packets are written into the TUN; IKE and keepalives
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
    init() {}
}

public final class Datapath: @unchecked Sendable {
    public let tunName: String
    public let counters = DatapathCounters()
    private let stack: XFRMStack
    private let logger: Logger
    private let pool = PacketPool(count: 256, slotSize: 4096, headroom: 256)
    private let tunFD: Int32
    private let rawFD: Int32
    private let udpFD: Int32
    private let udpPort: UInt16
    private let wanIfindex: Int32
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t? = nil

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
        let net = stack.network
        do throws(NetworkError) {
            let wan = try net.addInterface(name: "wan", kind: "dummy")
            try net.modify(name: "wan") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
            try net.addRoute(IPPrefix("0.0.0.0/0")!, device: "wan", via: nil)
            try net.addRoute(IPPrefix("::/0")!, device: "wan", via: nil)
            self.wanIfindex = wan.index
        } catch {
            close(fd)
            if raw >= 0 { close(raw) }
            close(udp)
            throw SocketError("cannot set up the network model: \(error.message)", errno: EINVAL)
        }
        self.refreshAddresses()
    }

    deinit {
        close(self.tunFD)
        if self.rawFD >= 0 { close(self.rawFD) }
        close(self.udpFD)
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
        var fds = [pollfd(fd: self.tunFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: self.udpFD, events: Int16(POLLIN), revents: 0)]
        if self.rawFD >= 0 { fds.append(pollfd(fd: self.rawFD, events: Int16(POLLIN), revents: 0)) }
        while !self.stopping.load(ordering: .relaxed) {
            for i in fds.indices { fds[i].revents = 0 }
            let n = poll(&fds, nfds_t(fds.count), 200)
            if n > 0 {
                if fds[0].revents & Int16(POLLIN) != 0 { self.drainTUN() }
                if fds[1].revents & Int16(POLLIN) != 0 { self.drainUDP() }
                if fds.count > 2 && fds[2].revents & Int16(POLLIN) != 0 { self.drainRaw() }
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
        switch self.stack.output(&buf) {
        case .transmit:
            self.sendToWire(buf)
        case .icmpError:
            self.writeTUN(buf)  // the error goes back to the inner sender
        case .offload, .dropped:
            break
        }
    }

    /// Sends what the stack protected; anything else read from the TUN had no policy and is dropped.
    private func sendToWire(_ buf: PacketBuffer) {
        let p = buf.data
        guard buf.count >= 20, p.loadByte(at: 0) >> 4 == 4 else {
            self.counters.tunNoPolicy.wrappingAdd(1, ordering: .relaxed)  // IPv6 outer: not at this stage
            return
        }
        let proto = p.loadByte(at: 9)
        let ihl = Int(p.loadByte(at: 0) & 0x0f) * 4
        var dst = sockaddr_in()
        dst.sin_family = sa_family_t(AF_INET)
        dst.sin_addr.s_addr = p.load(fromByteOffset: 16, as: UInt32.self)  // already network order
        let sent: Int
        if proto == UInt8(IPPROTO_ESP), self.rawFD >= 0 {
            sent = withUnsafePointer(to: &dst) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(self.rawFD, p, buf.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        } else if proto == UInt8(IPPROTO_UDP), buf.count >= ihl + 8,
            p.loadBE16(at: ihl) == self.udpPort, p.loadBE32(at: ihl + 8) != 0
        {
            dst.sin_port = p.loadBE16(at: ihl + 2).bigEndian
            sent = withUnsafePointer(to: &dst) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(self.udpFD, p + ihl + 8, buf.count - ihl - 8, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
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

    private func drainRaw() {
        for _ in 0..<64 {
            guard var buf = self.pool.allocate() else {
                self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
                return
            }
            let room = 2048
            let p = buf.append(room)
            let n = recv(self.rawFD, p, room, Int32(MSG_DONTWAIT))
            guard n > 0 else {
                self.pool.release(buf)
                return
            }
            buf.trimBack(room - n)
            self.counters.wireReceived.wrappingAdd(1, ordering: .relaxed)
            self.input(&buf)
        }
    }

    /// A UDP datagram on the NAT-T port, framed again as the IPv4/UDP packet it arrived in.
    private func drainUDP() {
        for _ in 0..<64 {
            guard var buf = self.pool.allocate() else {
                self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
                return
            }
            let room = 2048
            let payload = buf.append(room)
            var from = sockaddr_in()
            var control = [UInt8](repeating: 0, count: 64)
            var iov = iovec(iov_base: payload, iov_len: room)
            let n: Int = withUnsafeMutablePointer(to: &from) { fromPtr in
                control.withUnsafeMutableBytes { ctl in
                    withUnsafeMutablePointer(to: &iov) { iovPtr in
                        var msg = msghdr()
                        msg.msg_name = UnsafeMutableRawPointer(fromPtr)
                        msg.msg_namelen = socklen_t(MemoryLayout<sockaddr_in>.size)
                        msg.msg_iov = iovPtr
                        msg.msg_iovlen = 1
                        msg.msg_control = ctl.baseAddress
                        msg.msg_controllen = ctl.count
                        return recvmsg(self.udpFD, &msg, Int32(MSG_DONTWAIT))
                    }
                }
            }
            guard n >= 0 else {
                self.pool.release(buf)
                return
            }
            buf.trimBack(room - n)
            // The local address the datagram was sent to (IP_PKTINFO: ipi_ifindex, ipi_spec_dst, ipi_addr).
            var local: UInt32 = 0
            if control.count >= 28 {
                let level = Int32(control[8]) | Int32(control[9]) << 8
                let type = Int32(control[12]) | Int32(control[13]) << 8
                if level == Int32(IPPROTO_IP) && type == Int32(IP_PKTINFO) {
                    local = control.withUnsafeBytes { $0.load(fromByteOffset: 16 + 8, as: UInt32.self) }
                }
            }
            let ip = buf.prepend(28)
            IPv4Header.write(ip, tos: 0, totalLength: buf.count, identification: 0, flags: 0, ttl: 64,
                             proto: UInt8(IPPROTO_UDP), source: UInt32(bigEndian: from.sin_addr.s_addr),
                             destination: UInt32(bigEndian: local))
            (ip + 20).storeBE16(UInt16(bigEndian: from.sin_port), at: 0)
            (ip + 20).storeBE16(self.udpPort, at: 2)
            (ip + 20).storeBE16(UInt16(8 + n), at: 4)
            (ip + 20).storeBE16(0, at: 6)
            self.counters.wireReceived.wrappingAdd(1, ordering: .relaxed)
            self.input(&buf)
        }
    }

    private func input(_ buf: inout PacketBuffer) {
        defer { self.pool.release(buf) }
        switch self.stack.input(&buf, ifindex: self.wanIfindex) {
        case .deliver, .forward:
            self.writeTUN(buf)
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
