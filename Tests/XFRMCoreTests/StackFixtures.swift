import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Two hosts, A (192.0.2.1, protecting 10.0.1.0/24) and B (192.0.2.2, protecting 10.0.2.0/24), each a stack on
/// its own manual clock, joined by `deliver`.
final class TwoHosts {
    let clock = ManualClock()
    let a: XFRMStack
    let b: XFRMStack
    let buffers = TestBuffers()
    let eventsA: EventBus.Subscription
    let eventsB: EventBus.Subscription

    init() throws {
        self.a = XFRMStack(clock: self.clock)
        self.b = XFRMStack(clock: self.clock)
        self.eventsA = self.a.events.subscribe()
        self.eventsB = self.b.events.subscribe()
        for (s, outer, inner) in [(self.a, "192.0.2.1/24", "10.0.1.1/24"), (self.b, "192.0.2.2/24", "10.0.2.1/24")] {
            try s.network.addInterface(name: "eth0", kind: "dummy")
            try s.network.modify(name: "eth0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
            try s.network.addAddress(IPPrefix(outer)!, device: "eth0")
            try s.network.addInterface(name: "lan0", kind: "dummy")
            try s.network.modify(name: "lan0") { (i: inout Interface) throws(NetworkError) in i.isUp = true }
            try s.network.addAddress(IPPrefix(inner)!, device: "lan0")
        }
        try self.a.network.addRoute(IPPrefix("10.0.2.0/24")!, device: "eth0", via: IPAddress("192.0.2.2"))
        try self.b.network.addRoute(IPPrefix("10.0.1.0/24")!, device: "eth0", via: IPAddress("192.0.2.1"))
    }

    static let key = PacketFactory.pattern(20, seed: 3)

    func sa(from: String, to: String, spi: UInt32, mode: ESPMode = .tunnel, reqid: UInt32 = 1,
            lifetime: LifetimeConfig = LifetimeConfig(), on stack: XFRMStack, window: Int = 32,
            natt: Bool = false, tfcPad: UInt32 = 0, direction: SADirection? = nil) throws -> SecurityAssociation {
        let crypto = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: Self.key, icvBits: 128)
        return try stack.makeSA(SAConfig(
            id: SAID(destination: IPAddress(to)!, spi: spi), source: IPAddress(from)!, selector: .any(family: 0),
            reqid: reqid, mode: mode, replayWindow: window, direction: direction, lifetime: lifetime,
            encapsulation: natt ? NATTEncapsulation() : nil, crypto: crypto, tfcPad: tfcPad))
    }

    /// Tunnel policies and SAs for 10.0.1.0/24 <-> 10.0.2.0/24 on both hosts (`natt`: ESP in UDP 4500; `tfcPad`:
    /// A's outbound SA pads to it).
    func tunnel(lifetime: LifetimeConfig = LifetimeConfig(), natt: Bool = false, tfcPad: UInt32 = 0) throws {
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let r = Template(source: IPAddress("192.0.2.2"), destination: IPAddress("192.0.2.1"), mode: 1, reqid: 2)
        let ab = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let ba = Selector(family: 4, source: IPPrefix("10.0.2.0/24")!, destination: IPPrefix("10.0.1.0/24")!)
        try self.a.addPolicy(Policy(selector: ab, direction: .outbound, templates: [t]), update: false)
        try self.a.addPolicy(Policy(selector: ba, direction: .inbound, templates: [r]), update: false)
        try self.b.addPolicy(Policy(selector: ab, direction: .inbound, templates: [t]), update: false)
        try self.b.addPolicy(Policy(selector: ab, direction: .forward, templates: [t]), update: false)
        try self.b.addPolicy(Policy(selector: ba, direction: .outbound, templates: [r]), update: false)
        try self.a.addState(self.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: lifetime, on: self.a,
                                    natt: natt, tfcPad: tfcPad))
        try self.b.addState(self.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, lifetime: lifetime, on: self.b,
                                    natt: natt))
        try self.a.addState(self.sa(from: "192.0.2.2", to: "192.0.2.1", spi: 0x2002, reqid: 2, on: self.a, natt: natt))
        try self.b.addState(self.sa(from: "192.0.2.2", to: "192.0.2.1", spi: 0x2002, reqid: 2, on: self.b, natt: natt))
    }

    /// A wide IN/FWD policy (any source into 10.0.2.0/24) on B, and A's SA whose selector covers only
    /// 10.0.1.0/24 → 10.0.2.0/24 on B's side (with `flags`, e.g. SAConfig.icmpFlag).
    func narrowSA(flags: UInt8 = 0) throws {
        var c = try self.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: self.b).currentConfig
        c.selector = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        c.flags = flags
        try self.b.addState(self.b.makeSA(c))
        try self.a.addState(self.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: self.a))
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        let wide = Selector(family: 4, source: IPPrefix("0.0.0.0/0")!, destination: IPPrefix("10.0.2.0/24")!)
        try self.a.addPolicy(Policy(selector: wide, direction: .outbound, templates: [t]), update: false)
        try self.b.addPolicy(Policy(selector: wide, direction: .inbound, templates: [t]), update: false)
        try self.b.addPolicy(Policy(selector: wide, direction: .forward, templates: [t]), update: false)
    }

    /// A UDP packet from 10.0.1.1 to `to` with `size` payload bytes.
    func packet(from: String = "10.0.1.1", to: String = "10.0.2.1", size: Int = 100, df: Bool = true) -> [UInt8] {
        PacketFactory.ipv4(source: from, destination: to, proto: 17, dontFragment: df,
                           payload: PacketFactory.udp(payload: PacketFactory.pattern(size)))
    }

    /// Runs `bytes` through A's output; returns the result and the bytes afterwards.
    func send(_ bytes: [UInt8], from stack: XFRMStack? = nil) -> (OutputResult, [UInt8]) {
        self.buffers.with(bytes) { (stack ?? self.a).output(&$0) }
    }

    func receive(_ bytes: [UInt8], at stack: XFRMStack? = nil) -> (InputResult, [UInt8]) {
        self.buffers.with(bytes) { (stack ?? self.b).input(&$0, ifindex: 2) }
    }
}

extension EventBus.Subscription {
    /// (kind, hard) pairs of the expire events drained.
    func expires() -> [(UInt32, Bool)] {
        self.drain().compactMap { e in
            if case .expire(let sa, let hard) = e { return (sa.id.spi, hard) }
            return nil
        }
    }
}
