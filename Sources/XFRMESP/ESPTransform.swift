// The ESP transform of one SA (RFC 4303; ≈ net/ipv4/esp4.c + esp6.c with the xfrm mode helpers).
//
// Output (`encapsulate`), in place on the packet buffer, synchronous:
//   parse the packet → take the next sequence number (refuse on overflow) → append padding, pad length, next header
//   and ICV room → (transport) move the IP header forward into the headroom / (tunnel) keep the whole packet →
//   write SPI, sequence number and IV → seal → (NAT-T) UDP header → fix the IP header or write the outer one.
//
// Input (`decapsulate`), after `ESPClassification.classify` found ESP and the caller found this SA by SPI:
//   length checks → anti-replay check (ESN high half inferred) → open (ICV checked in constant time, then
//   decrypt) → trailer and padding checks → advance the window → strip ESP → (tunnel) the inner packet, ECN/DSCP
//   per RFC 6040 / (transport) restore the IP header.
//
// Not thread-safe: one caller at a time per SA (the XFRM core holds the SA's lock); one cipher per SA, used by
// whichever thread holds that lock. Every accessor below, the read-only ones included, belongs under it too.

import XFRMCrypto
import XFRMPacket

/// Per-SA counters (≈ xfrm_state's curlft and stats).
public struct ESPStatistics: Sendable, Equatable {
    /// Packets and bytes (of the protected payload) through this SA.
    public var packets: UInt64 = 0
    public var bytes: UInt64 = 0
    /// Inbound: packets left of the window (kernel `replay-window`).
    public var replayWindow: UInt64 = 0
    /// Inbound: duplicates (kernel `replay`).
    public var replay: UInt64 = 0
    /// Inbound: ICV failures (kernel `failed`, integrity_failed).
    public var integrityFailed: UInt64 = 0
    public init() {}
}

/// The ESP transform state of one SA: its cipher, outbound sequence counter and inbound replay window.
public final class ESPTransform: @unchecked Sendable {
    /// The SA's SPI.
    public let spi: UInt32
    public let cipher: any ESPCipher
    /// What the packet path reads of the configuration (the rest — keys, starting sequence numbers and window — is
    /// in the cipher and the per-packet state: one SA in 100,000 is not worth a second copy of its ESPConfig).
    private let flags: ESPFlags
    private let outerHopLimit: UInt8
    /// Tunnel mode: the outer addresses.
    private let tunnelSource: IPAddress?
    private let tunnelDestination: IPAddress?
    /// The last outbound sequence number used (64-bit; only the low half goes on the wire). Like every accessor of
    /// the per-packet state, read it under the SA's lock (the core's `SecurityAssociation.withLock`).
    public var outboundSequence: UInt64 { self.state.outboundSequence }
    /// The inbound anti-replay window.
    public var replay: ReplayWindow { self.state.replay }
    /// The highest sequence number received (the window's top), without copying the window.
    public var replayTop: UInt64 { self.state.replay.top }
    /// What the transform counted (zeros when it was made with `statistics: false`).
    public var statistics: ESPStatistics { self.counters?.pointee ?? ESPStatistics() }
    /// The NAT-T ports in use (the SA's, updated when the peer's NAT mapping moves; ≈ x->encap).
    public var encapsulation: NATTEncapsulation? { self.state.encapsulation }

    /// Whether a peer's move to source `port` is to be told to the key manager now (≈ km_new_mapping with
    /// x->mapping_maxage): always without a limit (`maxAge` 0); with one, when the port differs from the last one
    /// told or more than `maxAge` seconds went by since, and then it counts as told. Called under the SA's lock.
    public func mappingDue(port: UInt16, now: UInt64, maxAge: UInt32) -> Bool {
        guard maxAge != 0 else { return true }
        guard now &- self.state.mappingTold > UInt64(maxAge) || self.state.mappingPort != port else { return false }
        self.state.mappingTold = now
        self.state.mappingPort = port
        return true
    }

    // Lengths and flags as bytes (each length below 256), read as Int: five Ints made every transform 40 bytes longer
    // (one SA in 100,000 counts). Declared after the tunnel addresses, into whose padding they fit.
    private let ivLength8: UInt8
    private let icvLength8: UInt8
    private let blockSize8: UInt8
    private var ivLength: Int { Int(self.ivLength8) }
    private var icvLength: Int { Int(self.icvLength8) }
    private var blockSize: Int { Int(self.blockSize8) }
    private let isTunnel: Bool
    private let esn: Bool
    private let mayWrap: Bool
    private let udpLength8: UInt8
    private let outerHeaderLength8: UInt8
    private var udpLength: Int { Int(self.udpLength8) }
    private var outerHeaderLength: Int { Int(self.outerHeaderLength8) }

    /// The transform's own counters, for esp-tool and tests; nil for an SA's transform, whose SA counts the same
    /// (40 bytes less per SA, and no second count per packet).
    private let counters: UnsafeMutablePointer<ESPStatistics>?

    /// Everything a packet changes. Whoever calls the transform already serializes it (the SA's lock, or the one
    /// thread that owns it), so the field skips Swift's dynamic exclusivity check, which would cost a thread-local
    /// access set on every read and write, several times per packet. Inline, not behind a pointer: one allocation
    /// and 32 bytes less per SA. The 8-byte fields first, so it packs without holes.
    private struct MutableState {
        var outboundSequence: UInt64
        var replay: ReplayWindow
        /// The last NAT-T mapping change told: when (seconds) and to which source port (x->new_mapping,
        /// x->new_mapping_sport).
        var mappingTold: UInt64 = 0
        var ipIdentification: UInt16 = 0
        var mappingPort: UInt16 = 0
        var encapsulation: NATTEncapsulation?
    }
    @exclusivity(unchecked) private var state: MutableState

    /// Builds the transform; the cipher comes from `backend`.
    /// `statistics: false` leaves the transform's own counters out (`statistics` then reads zeros).
    public init(_ config: ESPConfig, backend: any ESPCryptoBackend = CryptoBackends.preferred, statistics: Bool = true)
        throws(ESPConfigError)
    {
        try config.validate()
        do {
            try config.crypto.validate()  // whatever the backend checks, an invalid spec never reaches it
            self.cipher = try backend.makeCipher(config.crypto)
        } catch {
            throw ESPConfigError(error.description)
        }
        // Every ESP block size is a power of two (4 for the AEADs and null, 16 for AES-CBC), so padding is a mask;
        // the lengths fit a byte. A backend (the protocol is public) that says otherwise is refused, not trusted.
        let (block, iv, icv) = (self.cipher.blockSize, self.cipher.ivLength, self.cipher.icvLength)
        guard block >= 4, block <= 128, block & (block - 1) == 0, (0...255).contains(iv), (0...255).contains(icv) else {
            throw ESPConfigError(
                "\(self.cipher.backendName): block size \(block), IV \(iv) or ICV \(icv) bytes not usable")
        }
        self.spi = config.spi
        self.flags = config.flags
        self.outerHopLimit = config.outerHopLimit
        (self.tunnelSource, self.tunnelDestination) = (config.tunnelSource, config.tunnelDestination)
        let replay = if let bitmap = config.inboundBitmap {
            ReplayWindow(size: config.replayWindow, esn: config.esn, top: config.inboundSequence, bitmap: bitmap)
        } else {
            ReplayWindow(size: config.replayWindow, esn: config.esn, top: config.inboundSequence)
        }
        if statistics {
            let c = UnsafeMutablePointer<ESPStatistics>.allocate(capacity: 1)
            c.initialize(to: ESPStatistics())
            self.counters = c
        } else {
            self.counters = nil
        }
        // The outer IPv4 identification starts at a value spread from the SPI, so that SAs between the same two
        // addresses (per-CPU SAs, a rekey's old and new) do not send the same identifications at once: a fragmented
        // packet's pieces must not be mistaken for another's (RFC 6864 §4.1; Linux uses hashed counters,
        // ip_select_ident). Two SAs with one SPI and key still write the same bytes.
        self.state = MutableState(
            outboundSequence: config.outboundSequence, replay: replay,
            ipIdentification: UInt16(truncatingIfNeeded: (config.spi &* 0x9E37_79B1) >> 16),
            encapsulation: config.encapsulation)
        self.ivLength8 = UInt8(iv)
        self.icvLength8 = UInt8(icv)
        self.blockSize8 = UInt8(block)
        self.isTunnel = config.mode == .tunnel
        self.esn = config.esn
        self.mayWrap = config.flags.contains(.outboundSequenceMayWrap)
        self.udpLength8 = config.encapsulation == nil ? 0 : UInt8(HeaderSize.udp)
        if config.mode == .tunnel, let d = config.tunnelDestination {
            self.outerHeaderLength8 = UInt8(d.version == 4 ? HeaderSize.ipv4Minimum : HeaderSize.ipv6)
        } else {
            self.outerHeaderLength8 = 0
        }
    }

    deinit {
        self.counters?.deallocate()
    }

    /// Bytes ESP adds in front of the payload (outer IP, UDP, ESP header, IV).
    public var headerOverhead: Int { self.outerHeaderLength + self.udpLength + 8 + self.ivLength }

    /// The largest number of bytes ESP can add to a packet (headers, maximum padding, trailer, ICV).
    public var maximumOverhead: Int { self.headerOverhead + self.blockSize - 1 + 2 + self.icvLength }


    /// New NAT-T ports for a UDP-encapsulated SA (≈ the encap copy in xfrm_state_update). Presence cannot change:
    /// returns false for an SA without UDP encapsulation or a nil argument.
    @discardableResult
    public func updateEncapsulation(_ e: NATTEncapsulation?) -> Bool {
        let current = self.state.encapsulation
        guard let e, current != nil else { return e == nil && current == nil }
        self.state.encapsulation = e
        return true
    }

    /// Moves the last-used outbound sequence number forward (key managers restoring state, tests). A value at or
    /// below the current one is refused (returns false): a counter that moved back would reuse nonces/IVs.
    @discardableResult
    public func setOutboundSequence(_ value: UInt64) -> Bool {
        guard value > self.state.outboundSequence else { return value == self.state.outboundSequence }
        self.state.outboundSequence = value
        return true
    }

    /// Replaces the inbound replay state with an empty window whose highest received number is `top`
    /// (≈ XFRM_MSG_NEWAE setting replay state, as a key manager does when it restores or migrates an SA).
    public func setInboundSequence(_ top: UInt64) {
        self.state.replay.reset(top: top)
    }

    /// Replaces the inbound replay state with a restored one (≈ XFRM_MSG_NEWAE's copy into x->replay or
    /// x->replay_esn): `top` the highest number received, the numbers below it received as `bitmap` says (none when
    /// nil). The window keeps its size.
    public func setInboundReplay(top: UInt64, bitmap: ReplayBitmap?) {
        let size = self.state.replay.size
        self.state.replay = if let bitmap {
            ReplayWindow(size: size, esn: self.esn, top: top, bitmap: bitmap)
        } else {
            ReplayWindow(size: size, esn: self.esn, top: top)
        }
    }

    // MARK: - Sequence numbers (≈ xfrm_replay_overflow)

    /// Takes the next outbound sequence number, or nil when the space is exhausted: at 2^32 without ESN (unless
    /// the SA may wrap) and at 2^64 with ESN. Never wraps silently.
    @inline(__always)
    private func takeSequence() -> UInt64? {
        let cur = self.state.outboundSequence
        if self.esn || self.mayWrap {
            guard cur != .max else { return nil }
        } else {
            guard cur < UInt64(UInt32.max) else { return nil }
        }
        self.state.outboundSequence = cur &+ 1
        return cur &+ 1
    }

    // MARK: - Output

    /// Protects the IP packet in `packet` in place. Returns nil on success (the buffer holds the ESP packet), or
    /// the reason the packet was dropped (the buffer is then unspecified). `fixedIV` (tests only) replaces the
    /// generated IV; `ivLength` bytes are read from it.
    @inline(__always)
    public func encapsulate(_ packet: inout PacketBuffer, fixedIV: UnsafeRawPointer? = nil) -> DropReason? {
        var layout = ESPLayout()
        return self.encapsulate(&packet, fixedIV: fixedIV, seal: true, layout: &layout)
    }

    /// Protects the packet in place as `encapsulate(_:)` does and says in `layout` where ESP went and how many bytes
    /// it carries. `innerHeaderChecked`: the caller verified the IPv4 header's checksum already (the stack's output
    /// path, which parsed the flow), so it is not summed again; every other check stays. `tfcPadTo` (tunnel mode):
    /// an inner packet shorter than this is followed by zero bytes up to it, inside the encryption and before ESP's
    /// own padding — traffic flow confidentiality padding (RFC 4303 §2.4, ≈ esp_output's tfclen); the caller passes
    /// the SA's `tfcpad` capped at the largest inner packet its path takes (xfrm_state_mtu).
    @inline(__always)
    public func encapsulate(_ packet: inout PacketBuffer, layout: inout ESPLayout, innerHeaderChecked: Bool = false,
                            tfcPadTo: Int = 0) -> DropReason?
    {
        self.encapsulate(&packet, fixedIV: nil, seal: true, layout: &layout, verifyChecksum: !innerHeaderChecked,
                         tfcPadTo: tfcPadTo)
    }

    /// Builds ESP around the packet but leaves sealing to an offload device (crypto offload TX, ≈ esp_xmit with
    /// CRYPTO_FALLBACK off): the headers, IV, padding and trailer are in place, the payload is still plaintext and
    /// the ICV room is zero. `layout` says where the device must seal.
    @inline(__always)
    public func encapsulateForDevice(_ packet: inout PacketBuffer, layout: inout ESPLayout,
                                     innerHeaderChecked: Bool = false) -> DropReason? {
        self.encapsulate(&packet, fixedIV: nil, seal: false, layout: &layout, verifyChecksum: !innerHeaderChecked)
    }

    @inline(__always)
    func encapsulate(_ packet: inout PacketBuffer, fixedIV: UnsafeRawPointer?, seal: Bool, layout: inout ESPLayout,
                     verifyChecksum: Bool = true, tfcPadTo: Int = 0) -> DropReason?
    {
        let p = packet.data
        let n = packet.count
        guard n >= 1 else { return .badOutputPacket }
        let version = p.loadByte(at: 0) >> 4
        var headerLength = 0  // transport: bytes of IP header kept in front of ESP
        var nhField = 0
        var tos: UInt8 = 0
        var df = true
        var flowLabel: UInt32 = 0  // an IPv6 inner packet's, copied to an IPv6 outer header
        let nextHeader: UInt8
        if version == 4 {
            guard let ip = IPv4Header.parse(p, available: n, verifyChecksum: verifyChecksum) else {
                return .badOutputPacket
            }
            if ip.totalLength < n { packet.trimBack(n - ip.totalLength) }
            tos = p.loadByte(at: 1)
            df = p.loadBE16(at: 6) & IPv4Header.flagDF != 0
            if self.isTunnel {
                nextHeader = IPProtocolNumber.ipv4
            } else {
                guard !ip.isFragment else { return .badOutputPacket }
                headerLength = ip.headerLength
                nhField = 9
                nextHeader = ip.proto
            }
        } else if version == 6 {
            guard n >= HeaderSize.ipv6 else { return .badOutputPacket }
            let total = HeaderSize.ipv6 + Int(p.loadBE16(at: 4))
            guard total <= n else { return .badOutputPacket }
            if total < n { packet.trimBack(n - total) }
            tos = IPv6Header.trafficClass(p)
            flowLabel = p.loadBE32(at: 0) & 0x000f_ffff
            if self.isTunnel {
                nextHeader = IPProtocolNumber.ipv6
            } else {
                guard let ins = IPv6Header.transportInsertionPoint(p, available: total) else {
                    return .badOutputPacket
                }
                headerLength = ins.offset
                nhField = ins.nextHeaderField
                nextHeader = p.loadByte(at: nhField)
                guard nextHeader != IPProtocolNumber.fragment else { return .badOutputPacket }
            }
        } else {
            return .badOutputPacket
        }
        let payloadLength = packet.count - headerLength
        // TFC padding: only a tunnel's inner packet says its own length (the kernel refuses tfcpad elsewhere). It
        // never costs the packet: what the buffer cannot hold after ESP's own trailer is left out (the kernel would
        // grow the skb instead).
        var tfcLength = 0
        if self.isTunnel && tfcPadTo > payloadLength {
            let room = packet.tailroom - (self.blockSize - 1 + 2 + self.icvLength)
            tfcLength = max(0, min(tfcPadTo - payloadLength, room))
        }
        // (blockSize - (x % blockSize)) % blockSize without a division: -x mod a power of two.
        let padLength = (0 &- (payloadLength &+ tfcLength &+ 2)) & (self.blockSize &- 1)
        let cryptLength = payloadLength + tfcLength + padLength + 2
        let espHeader = 8 + self.ivLength
        let front = espHeader + self.udpLength + self.outerHeaderLength
        let back = tfcLength + padLength + 2 + self.icvLength
        guard packet.headroom >= front, packet.tailroom >= back else { return .noBufferSpace }
        let finalLength = packet.count + front + back
        let outerV4 = self.isTunnel ? self.outerHeaderLength == HeaderSize.ipv4Minimum : version == 4
        guard outerV4 ? finalLength <= 65535 : finalLength - HeaderSize.ipv6 <= 65535 else { return .noBufferSpace }
        guard let seq = self.takeSequence() else { return .sequenceOverflow }

        // Trailer: TFC padding (zeros, as esp_output_fill_trailer writes it), then padding 1, 2, 3, ... (RFC 4303
        // §2.4), pad length, next header; then room for the ICV.
        let tfc = packet.append(back)
        if tfcLength > 0 { tfc.initializeMemory(as: UInt8.self, repeating: 0, count: tfcLength) }
        let trailer = tfc + tfcLength
        var i = 0
        while i < padLength {
            trailer.storeByte(UInt8(truncatingIfNeeded: i + 1), at: i)
            i += 1
        }
        trailer.storeByte(UInt8(truncatingIfNeeded: padLength), at: padLength)
        trailer.storeByte(nextHeader, at: padLength + 1)

        let esp: UnsafeMutableRawPointer
        if self.isTunnel {
            esp = packet.prepend(espHeader)
        } else {
            // Move the IP header (and IPv6 headers before the insertion point) forward into the headroom.
            let old = packet.data
            let new = packet.prepend(espHeader + self.udpLength)
            new.copyMemory(from: old, byteCount: headerLength)
            esp = new + headerLength + self.udpLength
        }
        esp.storeBE32(self.spi, at: 0)
        esp.storeBE32(UInt32(truncatingIfNeeded: seq), at: 4)
        if let fixedIV {
            (esp + 8).copyMemory(from: fixedIV, byteCount: self.ivLength)
        } else {
            // The sequence number stays taken: a failed packet never gives its number (and IV) back.
            guard self.cipher.writeIV(esp + 8, sequence: seq) else { return .encryptFailed }
        }
        let esnHigh: UInt32? = self.esn ? UInt32(truncatingIfNeeded: seq >> 32) : nil
        if seal {
            guard self.cipher.seal(esp: esp, cryptLength: cryptLength, esnHigh: esnHigh) else { return .encryptFailed }
        } else {
            (esp + 8 + self.ivLength + cryptLength).initializeMemory(as: UInt8.self, repeating: 0, count: self.icvLength)
        }
        if let c = self.counters {
            c.pointee.packets &+= 1
            c.pointee.bytes &+= UInt64(payloadLength)
        }

        if self.isTunnel {
            if self.udpLength != 0 { packet.prepend(HeaderSize.udp) }
            let outer = packet.prepend(self.outerHeaderLength)
            self.writeOuterHeader(outer, totalLength: packet.count, innerTOS: tos, innerDF: df, innerV4: version == 4,
                                  innerLength: payloadLength, innerFlowLabel: flowLabel)
        } else {
            let ip = packet.data
            let proto = self.udpLength != 0 ? IPProtocolNumber.udp : IPProtocolNumber.esp
            ip.storeByte(proto, at: nhField)
            if version == 4 {
                ip.storeBE16(UInt16(truncatingIfNeeded: packet.count), at: 2)
                IPv4Header.updateChecksum(ip, headerLength: headerLength)
            } else {
                ip.storeBE16(UInt16(truncatingIfNeeded: packet.count - HeaderSize.ipv6), at: 4)
            }
        }
        if let encap = self.state.encapsulation {
            self.writeUDPHeader(packet: packet, encap: encap, outerV4: outerV4, espOffset: esp - packet.data)
        }
        layout = ESPLayout(espOffset: esp - packet.data, cryptLength: cryptLength, esnHigh: esnHigh, sequence: seq,
                           payloadLength: payloadLength)
        return nil
    }

    /// The outer header of a tunnel-mode packet (≈ xfrm4_tunnel_encap_add / xfrm6_tunnel_encap_add): DSCP and ECN
    /// from the inner packet as the flags allow (RFC 6040 normal mode unless noecn); over IPv4, DF unless nopmtudisc
    /// from an inner IPv4 packet, and set for an inner IPv6 packet longer than IPv6's minimum MTU (one of 1,280 bytes
    /// or less may be fragmented on the IPv4 path, which must carry it: xfrm4_tunnel_encap_add's small_ipv6), with
    /// identification 0 under DF (ip_select_ident without a socket; an atomic datagram's ID means nothing, RFC 6864
    /// §4.1) and the SA's counter otherwise; over IPv6, the inner IPv6 packet's flow label (0 for an IPv4 inner
    /// packet, as xfrm4_extract_header leaves it), so ECMP keeps the inner flows apart.
    @inline(__always)
    private func writeOuterHeader(
        _ outer: UnsafeMutableRawPointer, totalLength: Int, innerTOS: UInt8, innerDF: Bool, innerV4: Bool,
        innerLength: Int, innerFlowLabel: UInt32
    ) {
        var tos: UInt8 = 0
        if !self.flags.contains(.dontEncapDSCP) { tos = innerTOS & 0xfc }
        if !self.flags.contains(.noECN) {
            let ecn = innerTOS & 0x03
            tos |= ecn == 0x03 ? 0x02 : ecn  // CE is encapsulated as ECT(0)
        }
        let proto = self.udpLength != 0 ? IPProtocolNumber.udp : IPProtocolNumber.esp
        switch (self.tunnelSource!, self.tunnelDestination!) {
        case (.v4(let s), .v4(let d)):
            let df = !self.flags.contains(.noPMTUDiscovery) && (innerV4 ? innerDF : innerLength > IPv6Header.minimumMTU)
            var id: UInt16 = 0
            if !df {
                self.state.ipIdentification &+= 1
                id = self.state.ipIdentification
            }
            IPv4Header.write(
                outer, tos: tos, totalLength: totalLength, identification: id, flags: df ? IPv4Header.flagDF : 0, ttl: self.outerHopLimit, proto: proto, source: s,
                destination: d)
        case (let s, let d):
            IPv6Header.write(
                outer, trafficClass: tos, flowLabel: innerFlowLabel, payloadLength: totalLength - HeaderSize.ipv6,
                nextHeader: proto, hopLimit: self.outerHopLimit, source: s, destination: d)
        }
    }

    /// The RFC 3948 UDP header in front of ESP: checksum 0 over IPv4 (§3.1.3), computed over IPv6.
    @inline(__always)
    private func writeUDPHeader(packet: PacketBuffer, encap: NATTEncapsulation, outerV4: Bool, espOffset: Int) {
        let ip = packet.data
        let udpOffset = espOffset - HeaderSize.udp
        let udp = ip + udpOffset
        let length = packet.count - udpOffset
        udp.storeBE16(encap.sourcePort, at: 0)
        udp.storeBE16(encap.destinationPort, at: 2)
        udp.storeBE16(UInt16(truncatingIfNeeded: length), at: 4)
        udp.storeBE16(0, at: 6)
        if !outerV4 {
            let c = UDPHeader.checksum(
                udp, length: length, source: IPAddress.loadV6(from: ip, at: 8),
                destination: IPAddress.loadV6(from: ip, at: 24))
            udp.storeBE16(c, at: 6)
        }
    }

    // MARK: - Input

    /// Classifies and, if the packet is ESP for this SA, decapsulates it (tools and tests; the XFRM core
    /// classifies, looks the SA up by SPI and calls `decapsulate(_:info:)`).
    public func decapsulate(_ packet: inout PacketBuffer, nattPort: UInt16? = 4500) -> ESPInputResult {
        switch ESPClassification.classify(&packet, nattPort: nattPort) {
        case .esp(let info):
            guard info.spi == self.spi else { return .dropped(.noState) }
            if let reason = self.decapsulate(&packet, info: info) { return .dropped(reason) }
            return .delivered
        case .ike: return .ike
        case .notESP: return .notESP
        case .drop(let r): return .dropped(r)
        }
    }

    /// Verifies and strips ESP from a packet `classify` located. Returns nil on success (the buffer holds the
    /// inner packet in tunnel mode, or the restored packet in transport mode), or the drop reason.
    @inline(__always)
    public func decapsulate(_ packet: inout PacketBuffer, info: ESPPacketInfo) -> DropReason? {
        self.decapsulate(&packet, info: info, cryptoDone: false)
    }

    /// Decapsulates; with `cryptoDone` an offload device already verified the ICV and decrypted in place (crypto
    /// offload RX, ≈ CRYPTO_DONE in the secpath), so only replay, trailer and mode processing run here.
    @inline(__always)
    public func decapsulate(_ packet: inout PacketBuffer, info: ESPPacketInfo, cryptoDone: Bool) -> DropReason? {
        var carried = 0
        return self.decapsulate(&packet, info: info, cryptoDone: cryptoDone, carried: &carried)
    }

    /// Decapsulates as above and sets `carried` to the bytes ESP carried once verified: its payload with any TFC
    /// padding, without ESP's own padding and trailer — what the kernel's curlft counts on input (skb->len after
    /// esp_input_done2; a tunnel's TFC padding goes only later, with the inner header's length).
    @inline(__always)
    public func decapsulate(_ packet: inout PacketBuffer, info: ESPPacketInfo, cryptoDone: Bool,
                            carried: inout Int) -> DropReason? {
        if info.udpEncapsulated != (self.udpLength != 0) { return .encapsulationMismatch }
        let p = packet.data
        let esp = p + info.espOffset
        let espLength = packet.count - info.espOffset
        let header = 8 + self.ivLength
        guard espLength >= header + self.icvLength + 2 else { return .truncated }
        let cryptLength = espLength - header - self.icvLength
        if self.blockSize > 4 && cryptLength & (self.blockSize &- 1) != 0 { return .badCipherLength }

        let seq: UInt64
        switch self.replayCheck(info.sequence) {
        case .accept(let s): seq = s
        case .reject(let r): return r
        }
        let esnHigh: UInt32? = self.esn ? UInt32(truncatingIfNeeded: seq >> 32) : nil
        guard cryptoDone || self.cipher.open(esp: esp, cryptLength: cryptLength, esnHigh: esnHigh) else {
            self.counters?.pointee.integrityFailed &+= 1
            return .icvFailed
        }
        let plain = esp + header
        let padLength = Int(plain.loadByte(at: cryptLength - 2))
        let nextHeader = plain.loadByte(at: cryptLength - 1)
        // At least one payload byte: pad length and next header filling the whole encrypted part is garbage, as
        // esp_remove_trailer's `padlen + 2 + alen >= elen` (XfrmInStateProtoError, the window unmoved).
        guard padLength + 2 < cryptLength else { return .badPadding }
        let payloadLength = cryptLength - 2 - padLength
        var i = 0
        while i < padLength {
            guard plain.loadByte(at: payloadLength + i) == UInt8(truncatingIfNeeded: i + 1) else { return .badPadding }
            i += 1
        }
        // Authenticated and well-formed: only now may the window move (RFC 4303 §3.4.3).
        self.state.replay.advance(seq)
        if let c = self.counters {
            c.pointee.packets &+= 1
            c.pointee.bytes &+= UInt64(payloadLength)
        }
        carried = payloadLength
        if nextHeader == IPProtocolNumber.noNextHeader { return .tfcDummy }

        if self.isTunnel {
            return self.stripTunnel(&packet, info: info, payloadOffset: info.espOffset + header,
                                    payloadLength: payloadLength, nextHeader: nextHeader)
        }
        return self.stripTransport(&packet, info: info, header: header, payloadLength: payloadLength,
                                   nextHeader: nextHeader)
    }

    /// The checks xfrm_input makes under the SA's lock before its lifetime check: the encapsulation type
    /// (XfrmInStateMismatch), then the replay window (`x->repl->check`, XfrmInStateSeqError). A packet rejected here
    /// never reaches the lifetime check, so a replayed packet can neither expire an SA nor make it dying.
    /// `decapsulate` repeats both (≈ `x->repl->recheck`); nothing changes in between under the SA's lock.
    @inline(__always)
    public func screen(_ info: ESPPacketInfo) -> DropReason? {
        if info.udpEncapsulated != (self.udpLength != 0) { return .encapsulationMismatch }
        if case .reject(let r) = self.replayCheck(info.sequence) { return r }
        return nil
    }

    /// The replay window's verdict on a received sequence number, counting a rejection in the ESP statistics.
    @inline(__always)
    private func replayCheck(_ low: UInt32) -> ReplayWindow.Check {
        let verdict = self.state.replay.check(low)
        if case .reject(let r) = verdict {
            if r == .replayDuplicate { self.counters?.pointee.replay &+= 1 }
            if r == .replayTooOld { self.counters?.pointee.replayWindow &+= 1 }
        }
        return verdict
    }

    /// Tunnel mode: the inner packet becomes the packet (≈ xfrm4_remove_tunnel_encap). Bytes behind the inner IP
    /// length are TFC padding and are dropped (RFC 4303 §2.4).
    @inline(__always)
    private func stripTunnel(
        _ packet: inout PacketBuffer, info: ESPPacketInfo, payloadOffset: Int, payloadLength: Int, nextHeader: UInt8
    ) -> DropReason? {
        let outer = packet.data
        let outerTOS: UInt8 = info.ipVersion == 4 ? outer.loadByte(at: 1) : IPv6Header.trafficClass(outer)
        let inner = outer + payloadOffset
        let innerLength: Int
        switch nextHeader {
        case IPProtocolNumber.ipv4:
            guard let ip = IPv4Header.parse(inner, available: payloadLength) else { return .badInnerPacket }
            innerLength = ip.totalLength
            var tos = inner.loadByte(at: 1)
            let newTOS = self.decapTOS(outer: outerTOS, inner: tos)
            if newTOS != tos {
                tos = newTOS
                inner.storeByte(tos, at: 1)
                IPv4Header.updateChecksum(inner, headerLength: ip.headerLength)
            }
        case IPProtocolNumber.ipv6:
            guard payloadLength >= HeaderSize.ipv6, inner.loadByte(at: 0) >> 4 == 6 else { return .badInnerPacket }
            innerLength = HeaderSize.ipv6 + Int(inner.loadBE16(at: 4))
            guard innerLength <= payloadLength else { return .badInnerPacket }
            let tc = IPv6Header.trafficClass(inner)
            let newTC = self.decapTOS(outer: outerTOS, inner: tc)
            if newTC != tc { IPv6Header.setTrafficClass(inner, newTC) }
        default:
            return .badNextHeader
        }
        packet.trimFront(payloadOffset)
        packet.trimBack(packet.count - innerLength)
        return nil
    }

    /// RFC 6040 decapsulation: a CE mark on the outer header is copied to an ECN-capable inner header (unless
    /// noecn); decap-dscp copies the outer DSCP.
    @inline(__always)
    private func decapTOS(outer: UInt8, inner: UInt8) -> UInt8 {
        var tos = inner
        if self.flags.contains(.decapDSCP) { tos = (outer & 0xfc) | (tos & 0x03) }
        if !self.flags.contains(.noECN) && outer & 0x03 == 0x03 && tos & 0x03 != 0 { tos |= 0x03 }
        return tos
    }

    /// Transport mode: close the gap ESP (and UDP) left and restore the IP header (≈ xfrm4_transport_input).
    @inline(__always)
    private func stripTransport(
        _ packet: inout PacketBuffer, info: ESPPacketInfo, header: Int, payloadLength: Int, nextHeader: UInt8
    ) -> DropReason? {
        let headerLength = info.transportOffset
        let removed = info.espOffset + header - headerLength
        let old = packet.data
        packet.trimBack(packet.count - (info.espOffset + header + payloadLength))
        packet.trimFront(removed)
        let ip = packet.data
        ip.copyMemory(from: old, byteCount: headerLength)  // overlapping, moving forward: memmove semantics
        ip.storeByte(nextHeader, at: info.nextHeaderFieldOffset)
        if info.ipVersion == 4 {
            ip.storeBE16(UInt16(truncatingIfNeeded: packet.count), at: 2)
            IPv4Header.updateChecksum(ip, headerLength: headerLength)
        } else {
            ip.storeBE16(UInt16(truncatingIfNeeded: packet.count - HeaderSize.ipv6), at: 4)
        }
        if self.udpLength != 0 && info.ipVersion == 4 {
            Self.fixTransportChecksum(ip, count: packet.count, headerLength: headerLength, proto: nextHeader)
        }
        return nil
    }

    /// NAT-T in transport mode (RFC 3948 §3.1.2): the sender summed its TCP or UDP checksum over the addresses it
    /// had before a NAT rewrote the outer (here also the inner) header, so it fails against the addresses the
    /// packet arrived with. The checksum is recomputed over them (the RFC's third way; the packet's integrity is the
    /// ICV's). Linux marks such a packet CHECKSUM_UNNECESSARY instead (esp_input_done2); a packet that leaves
    /// through xfrmd's TUN is checked again by the host's kernel, so it must carry a checksum that verifies. A UDP
    /// datagram without a checksum (0) keeps none. IPv4 only: RFC 3948 is about IPv4 NATs, and an IPv6 packet is
    /// left as it came.
    @inline(__always)
    static func fixTransportChecksum(_ ip: UnsafeMutableRawPointer, count: Int, headerLength: Int, proto: UInt8) {
        let field: Int
        switch proto {
        case IPProtocolNumber.tcp: field = 16
        case IPProtocolNumber.udp: field = 6
        default: return
        }
        var length = count - headerLength
        guard length >= field + 2 else { return }
        let l4 = ip + headerLength
        if proto == IPProtocolNumber.udp {
            if l4.loadBE16(at: 6) == 0 { return }
            // The datagram is what its UDP length says (udp_rcv trims to it before checking): bytes after it (a
            // sender's TFC padding) are not summed. A length that does not fit leaves the packet as it came.
            let udpLength = Int(l4.loadBE16(at: 4))
            guard udpLength >= HeaderSize.udp && udpLength <= length else { return }
            length = udpLength
        }
        l4.storeBE16(0, at: field)
        let sum = InternetChecksum.partial(l4, count: length,
                                           initial: TCPOffload.pseudoHeader(ip, proto: proto, length: length))
        let checksum = InternetChecksum.finish(sum)
        l4.storeBE16(checksum == 0 && proto == IPProtocolNumber.udp ? 0xffff : checksum, at: field)
    }
}

/// Where `encapsulateForDevice` left the ESP packet for the device to seal.
public struct ESPLayout: Sendable, Equatable {
    /// Offset of the SPI from the packet start.
    public var espOffset: Int = 0
    /// Bytes to encrypt after the IV (payload, padding, pad length, next header).
    public var cryptLength: Int = 0
    /// The ESN high half to authenticate, if ESN.
    public var esnHigh: UInt32? = nil
    /// The full sequence number used.
    public var sequence: UInt64 = 0
    /// The bytes ESP carries: the inner packet in tunnel mode, what follows the IP header (and the IPv6 headers
    /// before the insertion point) in transport mode. It is what the SA's curlft counts, as the kernel counts
    /// skb->len after xfrm_outer_mode_output (xfrm4/6_transport_output pull the header first).
    public var payloadLength: Int = 0
    public init() {}
    public init(espOffset: Int, cryptLength: Int, esnHigh: UInt32?, sequence: UInt64, payloadLength: Int = 0) {
        self.espOffset = espOffset
        self.cryptLength = cryptLength
        self.esnHigh = esnHigh
        self.sequence = sequence
        self.payloadLength = payloadLength
    }
}

/// The result of `ESPTransform.decapsulate(_:nattPort:)`.
public enum ESPInputResult: Equatable, Sendable {
    /// The buffer holds the delivered packet.
    case delivered
    case dropped(DropReason)
    /// IKE on the NAT-T port (non-ESP marker): for the key manager.
    case ike
    /// Not ESP at all.
    case notESP
}

extension ESPTransform {
    /// The largest packet this SA can protect without the result exceeding `mtu` (≈ xfrm_state_mtu): what an ICMP
    /// "fragmentation needed" / "packet too big" reports.
    public func maximumPayload(forMTU mtu: Int) -> Int {
        let room = mtu - self.headerOverhead - self.cipher.icvLength
        let block = self.cipher.blockSize
        return max(0, (room / block) * block - 2)
    }
}
