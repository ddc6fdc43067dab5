import Synchronization
import XFRMPacket

/// An interface of the stack's small network model (name, index, MTU, up/down, addresses).
public struct Interface: Sendable, Equatable {
    public var index: Int32
    public var name: String
    /// "dummy", "simnic", "tun", ...
    public var kind: String
    public var mtu: Int
    public var isUp: Bool
    public var addresses: [IPPrefix]
    public init(index: Int32, name: String, kind: String, mtu: Int = 1500, isUp: Bool = false,
                addresses: [IPPrefix] = []) {
        self.index = index
        self.name = name
        self.kind = kind
        self.mtu = mtu
        self.isUp = isUp
        self.addresses = addresses
    }
}

/// A route: longest prefix wins; `via` is the next hop (nil: directly connected).
public struct Route: Sendable, Equatable {
    public var prefix: IPPrefix
    public var ifindex: Int32
    public var via: IPAddress?
    public init(prefix: IPPrefix, ifindex: Int32, via: IPAddress? = nil) {
        self.prefix = prefix
        self.ifindex = ifindex
        self.via = via
    }
}


/// Interfaces, addresses and routes (≈ the bits of rtnetlink the XFRM paths need). Snapshot reads for the data path.
public final class NetworkModel: @unchecked Sendable {
    private struct State {
        var interfaces: [Interface] = [Interface(index: 1, name: "lo", kind: "loopback", mtu: 65536, isUp: true,
                                                 addresses: [IPPrefix("127.0.0.1/8")!, IPPrefix("::1/128")!])]
        var routes: [Route] = []
        var nextIndex: Int32 = 2
    }
    private let state = XFRMMutex(State())
    private let changes = Atomic<UInt64>(0)

    public init() {}

    private let observers = XFRMMutex<[@Sendable (Interface) -> Void]>([])

    /// Calls `observer` with an interface after every `modify` of it (link state, MTU): devices follow their
    /// interface whatever changed it.
    public func observe(_ observer: @escaping @Sendable (Interface) -> Void) {
        self.observers.withLock { $0.append(observer) }
    }

    /// Bumped on every change of interfaces, addresses or routes.
    public var generation: UInt64 { self.changes.load(ordering: .acquiring) }

    public var interfaces: [Interface] { self.state.withLock { $0.interfaces } }
    public var routes: [Route] { self.state.withLock { $0.routes } }

    public func interface(named name: String) -> Interface? {
        self.state.withLock { $0.interfaces.first { $0.name == name } }
    }

    public func interface(index: Int32) -> Interface? {
        self.state.withLock { $0.interfaces.first { $0.index == index } }
    }

    /// `ip link add NAME type KIND [mtu N]`.
    @discardableResult
    /// `index`: the interface index to take (a daemon mirrors a host device's), nil for the next free one.
    public func addInterface(name: String, kind: String, mtu: Int = 1500, index: Int32? = nil) throws(NetworkError)
        -> Interface
    {
        self.changes.wrappingAdd(1, ordering: .releasing)
        defer { self.changes.wrappingAdd(1, ordering: .releasing) }
        return try self.state.withLock { s throws(NetworkError) -> Interface in
            guard !name.isEmpty, name.count < 16, !name.contains("/"), !name.contains(" ") else {
                throw NetworkError(22, "Error: argument \"\(name)\" is wrong: \"name\" not a valid ifname")
            }
            guard !s.interfaces.contains(where: { $0.name == name }) else {
                throw NetworkError(17, "RTNETLINK answers: File exists")
            }
            guard mtu >= 68 && mtu <= 65535 else {
                throw NetworkError(22, "Error: mtu greater than device maximum.")
            }
            if let index, index <= 0 || s.interfaces.contains(where: { $0.index == index }) {
                throw NetworkError(17, "RTNETLINK answers: File exists")
            }
            let i = Interface(index: index ?? s.nextIndex, name: name, kind: kind, mtu: mtu)
            s.nextIndex = max(s.nextIndex, i.index + 1)
            s.interfaces.append(i)
            return i
        }
    }

    /// Changes an interface (`ip link set`). Returns the interface before and after.
    @discardableResult
    public func modify(name: String, _ change: (inout Interface) throws(NetworkError) -> Void)
        throws(NetworkError) -> (before: Interface, after: Interface)
    {
        self.changes.wrappingAdd(1, ordering: .releasing)
        defer { self.changes.wrappingAdd(1, ordering: .releasing) }
        let result = try self.state.withLock { s throws(NetworkError) -> (Interface, Interface) in
            guard let i = s.interfaces.firstIndex(where: { $0.name == name }) else {
                throw NetworkError(19, "Cannot find device \"\(name)\"")
            }
            let before = s.interfaces[i]
            var copy = before
            try change(&copy)
            s.interfaces[i] = copy
            return (before, copy)
        }
        for o in self.observers.withLock({ $0 }) { o(result.1) }
        return result
    }

    /// `ip link del NAME`: removes the interface and its routes.
    @discardableResult
    public func deleteInterface(name: String) throws(NetworkError) -> Interface {
        self.changes.wrappingAdd(1, ordering: .releasing)
        defer { self.changes.wrappingAdd(1, ordering: .releasing) }
        return try self.state.withLock { s throws(NetworkError) -> Interface in
            guard let i = s.interfaces.firstIndex(where: { $0.name == name }) else {
                throw NetworkError(19, "Cannot find device \"\(name)\"")
            }
            guard s.interfaces[i].kind != "loopback" else {
                throw NetworkError(95, "RTNETLINK answers: Operation not supported")
            }
            let gone = s.interfaces.remove(at: i)
            s.routes.removeAll { $0.ifindex == gone.index }
            return gone
        }
    }

    /// `ip addr add ADDR/PLEN dev NAME`; also adds the connected route, as the kernel does.
    public func addAddress(_ prefix: IPPrefix, device: String) throws(NetworkError) {
        self.changes.wrappingAdd(1, ordering: .releasing)
        defer { self.changes.wrappingAdd(1, ordering: .releasing) }
        return try self.state.withLock { s throws(NetworkError) in
            guard let i = s.interfaces.firstIndex(where: { $0.name == device }) else {
                throw NetworkError(19, "Cannot find device \"\(device)\"")
            }
            guard !s.interfaces[i].addresses.contains(prefix) else {
                throw NetworkError(17, "RTNETLINK answers: File exists")
            }
            s.interfaces[i].addresses.append(prefix)
            let net = Self.network(of: prefix)
            if !s.routes.contains(where: { $0.prefix == net && $0.ifindex == s.interfaces[i].index }) {
                s.routes.append(Route(prefix: net, ifindex: s.interfaces[i].index))
            }
        }
    }

    /// `ip route add PREFIX dev NAME [via ADDR]`.
    public func addRoute(_ prefix: IPPrefix, device: String, via: IPAddress?) throws(NetworkError) {
        self.changes.wrappingAdd(1, ordering: .releasing)
        defer { self.changes.wrappingAdd(1, ordering: .releasing) }
        return try self.state.withLock { s throws(NetworkError) in
            guard let i = s.interfaces.first(where: { $0.name == device }) else {
                throw NetworkError(19, "Cannot find device \"\(device)\"")
            }
            if let via, via.version != prefix.address.version {
                throw NetworkError(22, "Error: inet address is expected rather than \"\(via)\".")
            }
            let net = Self.network(of: prefix)
            guard !s.routes.contains(where: { $0.prefix == net }) else {
                throw NetworkError(17, "RTNETLINK answers: File exists")
            }
            s.routes.append(Route(prefix: net, ifindex: i.index, via: via))
        }
    }

    /// The prefix with host bits cleared.
    public static func network(of p: IPPrefix) -> IPPrefix {
        switch p.address {
        case .v4(let a):
            let mask: UInt32 = p.length == 0 ? 0 : ~(UInt32.max >> UInt32(p.length))
            return IPPrefix(.v4(a & mask), length: p.length)
        case .v6(let hi, let lo):
            let l = Int(p.length)
            let mh: UInt64 = l == 0 ? 0 : (l >= 64 ? ~0 : ~(UInt64.max >> UInt64(l)))
            let ml: UInt64 = l <= 64 ? 0 : (l >= 128 ? ~0 : ~(UInt64.max >> UInt64(l - 64)))
            return IPPrefix(.v6(hi & mh, lo & ml), length: p.length)
        }
    }

    /// The outgoing interface index and MTU for `destination` (the data path's lookup: nothing copied).
    @inline(__always)
    public func egress(to destination: IPAddress) -> (ifindex: Int32, mtu: Int)? {
        self.state.withLock { s in
            var best = -1
            var bestLength = -1
            var i = 0
            while i < s.routes.count {
                let r = s.routes[i]
                if Int(r.prefix.length) > bestLength && r.prefix.address.version == destination.version
                    && r.prefix.contains(destination) {
                    best = i
                    bestLength = Int(r.prefix.length)
                }
                i += 1
            }
            guard best >= 0 else { return nil }
            let ifindex = s.routes[best].ifindex
            var j = 0
            while j < s.interfaces.count {
                if s.interfaces[j].index == ifindex {
                    return s.interfaces[j].isUp ? (ifindex, s.interfaces[j].mtu) : nil
                }
                j += 1
            }
            return nil
        }
    }

    /// True when `address` is assigned to one of our interfaces (local delivery).
    @inline(__always)
    public func isLocal(_ address: IPAddress) -> Bool {
        self.state.withLock { s in
            s.interfaces.contains { i in i.addresses.contains { $0.address == address } }
        }
    }

    /// The interface that holds `address` (≈ the device of its local route), or nil when it is not ours.
    @inline(__always)
    public func localInterface(owning address: IPAddress) -> Int32? {
        self.state.withLock { s in
            s.interfaces.first { i in i.addresses.contains { $0.address == address } }?.index
        }
    }

    /// A source address for traffic to `destination` leaving `ifindex` (first address of its family).
    public func sourceAddress(ifindex: Int32, version: Int) -> IPAddress? {
        self.state.withLock { s in
            s.interfaces.first { $0.index == ifindex }?.addresses.first { $0.address.version == version }?.address
        }
    }
}
