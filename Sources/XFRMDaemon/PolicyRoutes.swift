#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Logging
import Synchronization
import XFRMCore
import XFRMPacket
import XFRMWire

/// `xfrmd --route-policies`: keeps one kernel route into the daemon's TUN device for the destination of every OUT
/// policy, so a key manager that installs only policies (strongSwan with `install_routes = no`) needs nothing else
/// for its traffic to reach the daemon. (The kernel's own IPsec needs no route: its policy lookup happens on the
/// output path whatever the route; a userspace stack only sees what is routed to it.)
///
/// Level-triggered: whenever policies change (an event), the wanted set — the destination prefix of each OUT policy
/// that protects (allow, with templates) — is computed from the SPD and compared with the routes this daemon added.
/// A route is added with NLM_F_EXCL in the main table (protocol static, scope link); one that already exists belongs
/// to somebody else and is neither taken over nor removed. Never routed: /0 prefixes (a default route into the TUN
/// would also carry the tunnel's own ESP and IKE), a transport-mode policy's destination (the peer itself), and any
/// prefix holding a tunnel endpoint of any policy or SA; each is logged. Routes are not re-checked against the
/// kernel between policy changes (one the kernel dropped, e.g. with the TUN going down, comes back at the next change).
/// Routes this daemon added are removed when their last policy goes and when it stops. Only policies of the TUN's
/// if_id (`--if-id`; 0 for an ordinary TUN) count: a route into the TUN for another if_id's traffic would only get
/// it dropped there (`tun_no_policy`).
public final class PolicyRoutes: @unchecked Sendable {
    private let stack: XFRMStack
    private let ifindex: Int32
    private let ifID: UInt32
    private let logger: Logger
    private let events: EventBus.Subscription
    private let fd: Int32
    private var installed: Set<Route> = []
    private var refused: Set<Route> = []
    private var sequence: UInt32 = 0
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t?

    struct Route: Hashable {
        let prefix: IPPrefix
    }

    public init(stack: XFRMStack, tunName: String, ifID: UInt32 = 0, logger: Logger) throws(SocketError) {
        let index = Int32(bitPattern: if_nametoindex(tunName))
        guard index > 0 else { throw SocketError("--route-policies: no device \(tunName)", errno: ENODEV) }
        let fd = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), netlinkRoute)
        guard fd >= 0 else { throw SocketError("--route-policies: cannot open NETLINK_ROUTE", errno: errno) }
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        self.stack = stack
        self.ifindex = index
        self.ifID = ifID
        self.logger = logger
        self.fd = fd
        self.events = stack.events.subscribe(capacity: 1024, acquire: false)
    }

    deinit {
        close(self.fd)
        self.stack.events.unsubscribe(self.events)
    }

    /// Installs the routes of the policies there are now, then follows every change on a thread of its own.
    public func start() {
        self.sync()
        let context = Unmanaged.passRetained(self).toOpaque()
        var id = pthread_t()
        let rc = pthread_create(&id, nil, { arg in
            Unmanaged<PolicyRoutes>.fromOpaque(arg!).takeRetainedValue().follow()
            return nil
        }, context)
        if rc == 0 { self.thread = id } else { Unmanaged<PolicyRoutes>.fromOpaque(context).release() }
    }

    /// The thread: a sync whenever policies changed (or events were lost), checked every 20 ms.
    private func follow() {
        while !self.stopping.load(ordering: .relaxed) {
            let (events, lost) = self.events.drainReportingLoss()
            if lost > 0 || events.contains(where: Self.concernsPolicies) { self.sync() }
            usleep(20_000)
        }
    }

    /// Stops following and removes every route this daemon added.
    public func stop() {
        self.stopping.store(true, ordering: .relaxed)
        if let t = self.thread { pthread_join(t, nil) }
        self.thread = nil
        for r in self.installed { _ = self.change(r, add: false) }
        self.installed = []
    }

    private static func concernsPolicies(_ e: XfrmEvent) -> Bool {
        switch e {
        case .policyAdded, .policyDeleted, .policiesFlushed, .policyExpire, .deviceFlushed: true
        default: false
        }
    }

    /// The routes the SPD asks for now: the destination (its network address) of each OUT policy that protects,
    /// unless it is /0, a transport-mode policy's (its destination is the peer itself), or holds any tunnel endpoint
    /// of any policy or SA (it would route the tunnel's own ESP and IKE into the TUN).
    func wanted() -> Set<Route> {
        let policies = self.stack.policies.list()
        var endpoints: [IPAddress] = []
        for p in policies {
            for t in p.templates {
                if let d = t.destination { endpoints.append(d) }
                if let s = t.source { endpoints.append(s) }
            }
        }
        // Not an ACQUIRE's larval SA (SPI 0): for a template without addresses it takes the packet's (inner)
        // addresses, and the trap's route must stay for the SA that answers it. ALLOCSPI's larval SAs carry the
        // peers' addresses and count.
        for sa in self.stack.states.list() where sa.state != .acquiring || sa.id.spi != 0 {
            endpoints += [sa.id.destination, sa.config.source]
        }
        var out: Set<Route> = []
        for p in policies where p.direction == .outbound && p.action == .allow && !p.templates.isEmpty
            && p.ifID == self.ifID
        {
            guard p.selector.family == 4 || p.selector.family == 6 else { continue }
            let dst = Self.network(p.selector.destination)
            let route = Route(prefix: dst)
            // A transport template's destination is the peer itself: routing it would send IKE and ESP into the
            // TUN. A template without addresses (an IKE daemon's on-demand trap, filled in at ACQUIRE time) leaves
            // the peer unknown: a host selector may be that peer, a wider one is the traffic to key.
            let transport = p.templates.contains { $0.mode == 0 && $0.destination != nil }
            let host = dst.length == (p.selector.family == 4 ? 32 : 128)
            let unknownPeer = host && p.templates.contains { $0.destination == nil }
            if dst.length == 0 || transport || unknownPeer || endpoints.contains(where: dst.contains) {
                if self.refused.insert(route).inserted {
                    self.logger.warning("--route-policies: not routing \(dst) into the TUN (a default route, a transport-mode peer, a host that may be the peer, or it holds a tunnel endpoint)")
                }
                continue
            }
            out.insert(route)
        }
        return out
    }

    /// The prefix with its host bits cleared: a selector may carry them, a route may not.
    static func network(_ p: IPPrefix) -> IPPrefix {
        let n = Int(p.length)
        switch p.address {
        case .v4(let a):
            let mask: UInt32 = n == 0 ? 0 : n >= 32 ? ~0 : ~(UInt32.max >> UInt32(n))
            return IPPrefix(.v4(a & mask), length: p.length)
        case .v6(let high, let low):
            let mh: UInt64 = n == 0 ? 0 : n >= 64 ? ~0 : ~(UInt64.max >> UInt64(n))
            let ml: UInt64 = n <= 64 ? 0 : n >= 128 ? ~0 : ~(UInt64.max >> UInt64(n - 64))
            return IPPrefix(.v6(high & mh, low & ml), length: p.length)
        }
    }

    func sync() {
        let want = self.wanted()
        for r in self.installed.subtracting(want) where self.change(r, add: false) { self.installed.remove(r) }
        for r in want.subtracting(self.installed) where self.change(r, add: true) { self.installed.insert(r) }
    }

    /// RTM_NEWROUTE (NLM_F_CREATE | NLM_F_EXCL) or RTM_DELROUTE for `r` via the TUN; true when the kernel agreed
    /// (an add that found a route there already is false: that route is not ours).
    private func change(_ r: Route, add: Bool) -> Bool {
        let address = r.prefix.address.bytes  // a network address (`network`)
        let family: UInt8 = r.prefix.address.version == 4 ? UInt8(AF_INET) : UInt8(AF_INET6)
        var m: [UInt8] = []
        func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { m += $0 } }
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { m += $0 } }
        func attribute(_ type: UInt16, _ value: [UInt8]) {
            u16(UInt16(4 + value.count))
            u16(type)
            m += value
            while m.count % 4 != 0 { m.append(0) }
        }
        self.sequence &+= 1
        u32(0)  // length, set below
        u16(add ? 24 : 25)  // RTM_NEWROUTE / RTM_DELROUTE
        u16(add ? 0x1 | 0x4 | 0x400 | 0x200 : 0x1 | 0x4)  // REQUEST|ACK (|CREATE|EXCL)
        u32(self.sequence)
        u32(0)
        // struct rtmsg: family, dst_len, src_len, tos, table (main), protocol (static), scope (link), type (unicast)
        m += [family, r.prefix.length, 0, 0, 254, 4, 253, 1]
        u32(0)  // rtm_flags
        attribute(1, address)  // RTA_DST
        withUnsafeBytes(of: self.ifindex.littleEndian) { attribute(4, Array($0)) }  // RTA_OIF
        let length = UInt32(m.count)
        withUnsafeBytes(of: length.littleEndian) { for i in 0..<4 { m[i] = $0[i] } }
        var kernel = SockaddrNetlink()
        let sent = m.withUnsafeBytes { b in
            withUnsafePointer(to: &kernel) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(self.fd, b.baseAddress, b.count, 0, $0, socklen_t(MemoryLayout<SockaddrNetlink>.size))
                }
            }
        }
        guard sent == m.count else {
            self.logger.error("--route-policies: cannot send to NETLINK_ROUTE: \(String(cString: strerror(errno)))")
            return false
        }
        var reply = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = reply.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            guard n >= 36 else {
                self.logger.error("--route-policies: no answer from NETLINK_ROUTE for \(r.prefix)")
                return false
            }
            let type = UInt16(reply[4]) | UInt16(reply[5]) << 8
            let seq = UInt32(reply[8]) | UInt32(reply[9]) << 8 | UInt32(reply[10]) << 16 | UInt32(reply[11]) << 24
            guard type == 2, seq == self.sequence else { continue }  // NLMSG_ERROR answering this request
            let error = Int32(bitPattern: UInt32(reply[16]) | UInt32(reply[17]) << 8 | UInt32(reply[18]) << 16
                              | UInt32(reply[19]) << 24)
            if error == 0 {
                self.logger.info("--route-policies: \(add ? "added" : "removed") route \(r.prefix) dev tun")
                return true
            }
            if add && error == -EEXIST {
                self.logger.notice("--route-policies: a route for \(r.prefix) exists already; left as it is")
            } else {
                self.logger.error("--route-policies: \(add ? "adding" : "removing") \(r.prefix): \(String(cString: strerror(-error)))")
            }
            return false
        }
    }
}
