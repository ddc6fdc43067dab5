import Foundation
import Synchronization
import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMSimulatedNIC
import XFRMTestKit

/// A thread-safe list the engine threads append to.
final class Recorder<T: Sendable>: Sendable {
    private let items = XFRMMutex<[T]>([])
    func append(_ t: T) { self.items.withLock { $0.append(t) } }
    var all: [T] { self.items.withLock { $0 } }
    var count: Int { self.items.withLock { $0.count } }
}

enum Algorithm: String, CaseIterable, Sendable {
    case gcm
    case cbc
    case chacha

    var spec: ESPCryptoSpec {
        switch self {
        case .gcm:
            try! .aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20, seed: 1), icvBits: 128)
        case .cbc:
            try! .cipher(
                name: "cbc(aes)", key: PacketFactory.pattern(16, seed: 2), authName: "hmac(sha256)",
                authKey: PacketFactory.pattern(32, seed: 3), truncationBits: 128)
        case .chacha:
            try! .aead(name: "rfc7539esp(chacha20,poly1305)", key: PacketFactory.pattern(36, seed: 4), icvBits: 128)
        }
    }
}

/// One SA's parameters, shared by the device's SA and the software peer's transform.
struct SAParams: Sendable, CustomStringConvertible {
    var family = 4
    var mode: ESPMode = .transport
    var natt = false
    var algorithm: Algorithm = .gcm
    var spi: UInt32 = 0x1001
    var reqid: UInt32 = 1
    var replayWindow = 64
    var esn = false
    var lifetime = LifetimeConfig()
    var outboundSequence: UInt64 = 0
    var inboundSequence: UInt64 = 0

    var description: String { "IPv\(self.family) \(self.mode)\(self.natt ? " NAT-T" : "") \(self.algorithm)" }

    /// Outer (and, in transport mode, the only) endpoints: local → remote.
    var local: IPAddress { self.family == 4 ? IPAddress("192.0.2.1")! : IPAddress("2001:db8:ff::1")! }
    var remote: IPAddress { self.family == 4 ? IPAddress("192.0.2.2")! : IPAddress("2001:db8:ff::2")! }
    /// Inner endpoints in tunnel mode.
    var innerLocal: String { self.family == 4 ? "10.0.1.1" : "2001:db8:1::1" }
    var innerRemote: String { self.family == 4 ? "10.0.2.1" : "2001:db8:2::1" }

    /// The plaintext packets travel between these.
    var flowSource: String { self.mode == .tunnel ? self.innerLocal : self.local.description }
    var flowDestination: String { self.mode == .tunnel ? self.innerRemote : self.remote.description }

    /// The SA for traffic local → remote (`outbound`) or remote → local.
    func config(outbound: Bool) -> SAConfig {
        let src = outbound ? self.local : self.remote
        let dst = outbound ? self.remote : self.local
        return SAConfig(
            id: SAID(destination: dst, spi: self.spi), source: src, selector: .any(family: 0), reqid: self.reqid,
            mode: self.mode, replayWindow: outbound ? 0 : self.replayWindow, lifetime: self.lifetime,
            encapsulation: self.natt ? NATTEncapsulation() : nil, esn: self.esn, crypto: self.algorithm.spec,
            outboundSequence: self.outboundSequence, inboundSequence: self.inboundSequence)
    }

    func sa(outbound: Bool) throws -> SecurityAssociation {
        try SecurityAssociation(self.config(outbound: outbound), addTime: 0)
    }

    /// A software transform for the same SA as `sa(outbound:)` (the peer's end of it), with a replay window.
    func software(outbound: Bool, backend: any ESPCryptoBackend = CryptoBackends.preferred) throws -> ESPTransform {
        let c = self.config(outbound: outbound)
        return try ESPTransform(
            ESPConfig(
                spi: c.id.spi, mode: c.mode, crypto: c.crypto!, tunnelSource: c.source,
                tunnelDestination: c.id.destination, encapsulation: c.encapsulation, esn: c.esn,
                replayWindow: 64, outboundSequence: c.outboundSequence,
                inboundSequence: c.inboundSequence),
            backend: backend)
    }

    /// The policy that sends (out) or accepts (in) this traffic through the SA.
    func policy(_ direction: PolicyDirection, reqid: UInt32? = nil, action: PolicyAction = .allow) -> Policy {
        let out = direction == .outbound
        let sel = Selector(
            family: self.family, source: IPPrefix(out ? self.flowSource : self.flowDestination)!,
            destination: IPPrefix(out ? self.flowDestination : self.flowSource)!)
        let tmpl: Template
        if self.mode == .tunnel {
            tmpl = Template(
                source: out ? self.local : self.remote, destination: out ? self.remote : self.local, mode: 1,
                reqid: reqid ?? self.reqid)
        } else {
            tmpl = Template(mode: 0, reqid: reqid ?? self.reqid)
        }
        return Policy(
            selector: sel, direction: direction, action: action, templates: [tmpl],
            offload: PolicyOffload(ifindex: 7))
    }

    /// A plaintext UDP packet local → remote (or back).
    func plaintext(_ n: Int = 100, seed: UInt8 = 0, reverse: Bool = false) -> [UInt8] {
        let s = reverse ? self.flowDestination : self.flowSource
        let d = reverse ? self.flowSource : self.flowDestination
        let udp = PacketFactory.udp(payload: PacketFactory.pattern(n, seed: seed))
        return self.family == 4
            ? PacketFactory.ipv4(source: s, destination: d, payload: udp)
            : PacketFactory.ipv6(source: s, destination: d, payload: udp)
    }
}

func offload(_ direction: OffloadDirection, _ type: OffloadType = .packet) -> StateOffload {
    StateOffload(ifindex: 7, direction: direction, type: type)
}

/// A software ESP peer with its own pool.
final class SoftwarePeer {
    let pool = PacketPool(count: 4, slotSize: 4096, headroom: 256)

    func encapsulate(_ plain: [UInt8], with t: ESPTransform) -> [UInt8] {
        var b = self.pool.allocate()!
        defer { self.pool.release(b) }
        precondition(b.append(contentsOf: plain))
        let r = t.encapsulate(&b)
        precondition(r == nil, "software encapsulation failed: \(String(describing: r))")
        return b.bytes
    }

    func decapsulate(_ frame: [UInt8], with t: ESPTransform) -> (ESPInputResult, [UInt8]) {
        var b = self.pool.allocate()!
        defer { self.pool.release(b) }
        precondition(b.append(contentsOf: frame))
        let r = t.decapsulate(&b)
        return (r, b.bytes)
    }
}

/// A NIC with its wire and host sides recorded, and a leak check at the end.
final class Harness: @unchecked Sendable {
    let pool: PacketPool
    let nic: SimulatedNIC
    let wire = Recorder<[UInt8]>()
    let host = Recorder<([UInt8], OffloadMetadata)>()
    let events = Recorder<UInt64>()

    init(modes: Set<OffloadType> = [.crypto, .packet], saCapacity: Int = 33, policyCapacity: Int = 64,
         mtu: Int = 1500, forward: Bool = false, engineThreads: Int = 1, queueDepth: Int = 1024,
         poolSize: Int = 64, name: String = "sim0", pool: PacketPool? = nil) {
        self.pool = pool ?? PacketPool(count: poolSize)
        self.nic = SimulatedNIC(
            name: name, ifindex: 7, modes: modes, saCapacity: saCapacity, policyCapacity: policyCapacity, mtu: mtu,
            supportsForwardPolicies: forward, pool: self.pool, engineThreads: engineThreads,
            queueDepth: queueDepth)
        let wire = self.wire
        let host = self.host
        let events = self.events
        let pool = self.pool
        self.nic.wireTap = { wire.append($0) }
        self.nic.hostReceive = { b, m in
            host.append((b.bytes, m))
            pool.release(b)
        }
        self.nic.limitEvent = { events.append($0) }
    }

    /// Host → device.
    func send(_ bytes: [UInt8], metadata: OffloadMetadata = OffloadMetadata()) {
        var b = self.pool.allocate()!
        precondition(b.append(contentsOf: bytes))
        self.nic.transmit(b, metadata: metadata)
    }

    /// Programs an SA and returns its handle.
    @discardableResult
    func add(_ sa: SecurityAssociation, _ o: StateOffload) throws -> UInt64 {
        try self.nic.stateAdd(sa, offload: o)
    }

    /// Drains, stops the engine and checks that every buffer came back.
    func finish(sourceLocation: SourceLocation = #_sourceLocation) {
        self.nic.drain()
        self.nic.shutdown()
        #expect(self.pool.available == self.pool.slotCount, "buffers leaked", sourceLocation: sourceLocation)
    }
}

/// Expects a DeviceError with this errno and message.
func expectRefusal(_ errno: Int32, _ message: String, sourceLocation: SourceLocation = #_sourceLocation,
                   _ body: () throws(DeviceError) -> Void) {
    do {
        try body()
        Issue.record("expected \"\(message)\" (errno \(errno)), got success", sourceLocation: sourceLocation)
    } catch {
        #expect(error.errno == errno, sourceLocation: sourceLocation)
        #expect(error.message == message, sourceLocation: sourceLocation)
    }
}

/// A backend whose cipher writes the IV but leaves the payload in clear and the ICV empty: what a host builds for
/// crypto offload before the device seals it.
struct UnsealedBackend: ESPCryptoBackend {
    var name: String { "unsealed" }
    func makeCipher(_ spec: ESPCryptoSpec) throws(AlgorithmError) -> any ESPCipher {
        let real = try OpenSSLBackend().makeCipher(spec)
        return UnsealedCipher(ivLength: real.ivLength, icvLength: real.icvLength, blockSize: real.blockSize)
    }
}

final class UnsealedCipher: ESPCipher {
    var backendName: String { "unsealed" }
    let ivLength: Int
    let icvLength: Int
    let blockSize: Int
    init(ivLength: Int, icvLength: Int, blockSize: Int) {
        self.ivLength = ivLength
        self.icvLength = icvLength
        self.blockSize = blockSize
    }
    func writeIV(_ iv: UnsafeMutableRawPointer, sequence: UInt64) -> Bool {
        for i in 0..<self.ivLength { iv.storeByte(0, at: i) }
        iv.storeBE64(sequence, at: 0)
        return true
    }
    func seal(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        for i in 0..<self.icvLength { esp.storeByte(0, at: 8 + self.ivLength + cryptLength + i) }
        return true
    }
    func open(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool { false }
}

/// Offset of the ESP header in an IP packet built by ESPTransform (no extension headers / options).
func espOffset(_ frame: [UInt8], natt: Bool) -> Int {
    (frame[0] >> 4 == 4 ? 20 : 40) + (natt ? 8 : 0)
}

func be32(_ b: [UInt8], _ at: Int) -> UInt32 {
    UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
}
