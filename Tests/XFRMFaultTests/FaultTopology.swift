import Foundation
import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMSimHost
import XFRMSimulatedNIC
import XFRMTestKit

/// Two simulated hosts joined by their simulated NICs (sim0, 192.0.2.1 ↔ 192.0.2.2), with a tunnel from A's
/// 10.0.1.0/24 to B's 10.0.2.0/24 offloaded as `mode` says (A: OUT SA and policy, B: IN SA and policy).
/// Every frame A puts on its wire and every packet leaving a dummy interface is captured, so that tests can count
/// what left in clear.
final class FaultTopology: @unchecked Sendable {
    let mode: OffloadType
    let a: SimHost
    let b: SimHost
    let nicA: SimulatedNIC
    let nicB: SimulatedNIC
    static let template = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1,
                                   reqid: 1)
    static let selector = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!)

    init(mode: OffloadType, poolSlots: Int = 4096) throws {
        self.mode = mode
        self.a = SimHost(stack: XFRMStack(), poolSlots: poolSlots, slotSize: 4096)
        self.b = SimHost(stack: XFRMStack(), poolSlots: 4096, slotSize: 4096)
        self.nicA = try self.a.addSimulatedNIC(name: "sim0", modes: [.crypto, .packet])
        self.nicB = try self.b.addSimulatedNIC(name: "sim0", modes: [.crypto, .packet], peer: self.nicA)
        for (host, outer, inner, remote, gateway) in [
            (self.a, "192.0.2.1/24", "10.0.1.1/24", "10.0.2.0/24", "192.0.2.2"),
            (self.b, "192.0.2.2/24", "10.0.2.1/24", "10.0.1.0/24", "192.0.2.1"),
        ] {
            try host.configureGateway(outer: outer, inner: inner, remote: remote, gateway: gateway)
        }
    }

    /// The policies and one offloaded SA pair (SPI 0x1001): the tunnel carries traffic.
    func addTunnel() throws {
        try self.addPolicies()
        try self.addInbound(spi: 0x1001)
        try self.addOutbound(spi: 0x1001)
    }

    /// A's OUT and B's IN policy (offloaded to the NICs in packet mode).
    func addPolicies() throws {
        let packet = self.mode == .packet
        _ = try self.a.stack.addPolicy(
            Policy(selector: Self.selector, direction: .outbound, templates: [Self.template],
                   offload: packet ? PolicyOffload(ifindex: self.nicA.ifindex) : nil), update: false)
        _ = try self.b.stack.addPolicy(
            Policy(selector: Self.selector, direction: .inbound, templates: [Self.template],
                   offload: packet ? PolicyOffload(ifindex: self.nicB.ifindex) : nil), update: false)
    }

    func config(spi: UInt32, window: Int, lifetime: LifetimeConfig = LifetimeConfig()) throws -> SAConfig {
        let spec = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20, seed: UInt8(spi & 0xff)),
                                          icvBits: 128)
        return SAConfig(id: SAID(destination: IPAddress("192.0.2.2")!, spi: spi), source: IPAddress("192.0.2.1")!,
                        selector: .any(family: 0), reqid: 1, mode: .tunnel, replayWindow: window, lifetime: lifetime,
                        crypto: spec)
    }

    /// Adds A's outbound SA (offloaded as `mode`, or in software with `offloaded` false); throws what the core
    /// threw.
    @discardableResult
    func addOutbound(spi: UInt32, offloaded: Bool = true, lifetime: LifetimeConfig = LifetimeConfig()) throws
        -> SecurityAssociation
    {
        let sa = try self.a.stack.makeSA(self.config(spi: spi, window: 0, lifetime: lifetime))
        try self.a.stack.addState(sa, offload: offloaded
            ? OffloadRequest(ifindex: self.nicA.ifindex, direction: .outbound, type: self.mode) : nil)
        return sa
    }

    @discardableResult
    func addInbound(spi: UInt32) throws -> SecurityAssociation {
        let sa = try self.b.stack.makeSA(self.config(spi: spi, window: 128))
        try self.b.stack.addState(sa, offload: OffloadRequest(ifindex: self.nicB.ifindex, direction: .inbound,
                                                              type: self.mode))
        return sa
    }

    /// `n` UDP packets 10.0.1.1 → 10.0.2.1 from A.
    func send(_ n: Int, seed: UInt8 = 0) {
        for i in 0..<n {
            let udp = PacketFactory.udp(payload: PacketFactory.pattern(200 + i % 64, seed: seed &+ UInt8(i & 0x3f)))
            self.a.send(PacketFactory.ipv4(source: "10.0.1.1", destination: "10.0.2.1", payload: udp))
        }
    }

    func settle() { self.a.settle(with: [self.b]) }

    /// Frames A put on any wire (its NIC's, its dummies'): each must be ESP (IP protocol 50) from 192.0.2.1.
    /// Returns how many there were and how many were not ESP (left in clear).
    func wireFromA() -> (frames: Int, clear: Int, spis: Set<UInt32>) {
        let frames = self.a.takeCaptured()
        var clear = 0
        var spis: Set<UInt32> = []
        for f in frames {
            if f.count >= 28 && f[0] >> 4 == 4 && f[9] == 50 {
                spis.insert(UInt32(f[20]) << 24 | UInt32(f[21]) << 16 | UInt32(f[22]) << 8 | UInt32(f[23]))
            } else {
                clear += 1
            }
        }
        return (frames.count, clear, spis)
    }

    /// The core's SAD and the device agree: the handles of the SAs the SAD says are offloaded to a NIC are exactly
    /// the SAs the NIC would use for traffic, and the offloaded policies of the SPD are the NIC's live policies.
    func expectConsistent(sourceLocation: SourceLocation = #_sourceLocation) {
        for (host, nic) in [(self.a, self.nicA), (self.b, self.nicB)] where !nic.hasVanished {
            let sad = Set(host.stack.states.list().compactMap { sa -> UInt64? in
                guard let o = sa.offload, o.ifindex == nic.ifindex, !o.acquire else { return nil }
                return o.handle
            })
            #expect(sad == nic.liveSAHandles, "SAD and device disagree", sourceLocation: sourceLocation)
            let spd = host.stack.policies.list().filter { $0.offload?.ifindex == nic.ifindex }.count
            #expect(spd == nic.livePolicies.count, "SPD and device disagree", sourceLocation: sourceLocation)
        }
    }

    /// Every buffer is back in both hosts' pools.
    func expectNoLeak(sourceLocation: SourceLocation = #_sourceLocation) {
        self.settle()
        #expect(self.a.pool.available == self.a.pool.slotCount, "A leaked buffers", sourceLocation: sourceLocation)
        #expect(self.b.pool.available == self.b.pool.slotCount, "B leaked buffers", sourceLocation: sourceLocation)
    }
}
