// The RX engine: what the device does with a frame from the wire (≈ the NIC's receive path with its IPsec
// steering: match (daddr, SPI), then decrypt).
//
//   ESP (raw or NAT-T on 4500) for a device SA:
//     packet offload → the device's transform checks replay and ICV, strips ESP (and the outer header in tunnel
//       mode), the device's IN policies must accept the inner flow, and the plaintext goes to the host marked
//       {cryptoDone, cryptoSuccess, packetOffloaded}; every drop is counted for updateStats.
//     crypto offload → the device verifies the ICV and decrypts in place; the host gets the still-ESP-framed
//       packet with {cryptoDone, cryptoSuccess: ICV ok} and does replay and the trailer itself.
//   Outer-fragmented ESP for a device SA → dropped and counted (the device never reassembles; XFRM never
//     processes such packets in software for packet SAs either).
//   Anything else → to the host unchanged with default metadata.

import XFRMCore
import XFRMESP
import XFRMPacket

extension NICCore {
    @inline(__always)
    func receiveOne(_ buffer: PacketBuffer, hooks: Hooks, snapshot: TableSnapshot) {
        self.counters.add(.rxPackets)
        self.counters.add(.rxBytes, UInt64(buffer.count))
        var packet = buffer
        switch ESPClassification.classify(&packet) {
        case .esp(let info):
            guard let sa = snapshot.rx[RXKey(destination: info.destination, spi: info.spi)] else {
                self.deliverToHost(packet, OffloadMetadata(), hooks: hooks)
                return
            }
            if sa.type == .packet {
                self.decapsulatePacketOffload(packet, info: info, sa: sa, hooks: hooks, snapshot: snapshot)
            } else {
                self.openCryptoOffload(packet, info: info, sa: sa, hooks: hooks)
            }
        case .drop(.fragmented) where self.fragmentForDeviceSA(packet, snapshot: snapshot):
            self.pool.release(packet)
            self.counters.rxDrop(.rxFragmentDrops)
        default:
            self.deliverToHost(packet, OffloadMetadata(), hooks: hooks)
        }
    }

    // MARK: - Packet offload

    @inline(__always)
    private func decapsulatePacketOffload(
        _ buffer: PacketBuffer, info: ESPPacketInfo, sa: SAEntry, hooks: Hooks, snapshot: TableSnapshot
    ) {
        enum Outcome {
            case delivered(SAEntryState.LimitCrossing)
            case consumed(SAEntryState.LimitCrossing)
            case dropped(DropReason)
            case expired
            case gone
        }
        var packet = buffer
        let length = packet.count
        let limits = sa.lifetime
        let outcome: Outcome = sa.state.withLock { s in
            guard !sa.deleted.load(ordering: .acquiring), let t = s.transform else { return .gone }
            if s.hardReached(limits) {
                sa.expired.store(true, ordering: .relaxed)
                return .expired
            }
            let reason = t.decapsulate(&packet, info: info)
            s.counters.inboundSequence = t.replay.top
            if let reason, reason != .tfcDummy {
                switch reason {
                case .replayDuplicate: s.counters.replay &+= 1
                case .replayTooOld: s.counters.replayWindow &+= 1
                case .sequenceZero: s.counters.sequenceZero &+= 1  // global XfrmInStateSeqError only
                case .icvFailed: s.counters.integrityFailed &+= 1
                default: s.counters.headerErrors &+= 1
                }
                return .dropped(reason)
            }
            let crossing = s.account(bytes: length, limits: limits, enforce: true)
            if crossing == .hard { sa.expired.store(true, ordering: .relaxed) }
            return reason == nil ? .delivered(crossing) : .consumed(crossing)
        }
        switch outcome {
        case .delivered(let crossing):
            self.counters.add(.espRX)
            if self.inboundPolicyAccepts(packet, sa: sa, snapshot: snapshot) {
                var m = OffloadMetadata()
                m.handle = sa.handle
                m.cryptoDone = true
                m.cryptoSuccess = true
                m.packetOffloaded = true
                self.deliverToHost(packet, m, hooks: hooks)
            } else {
                self.pool.release(packet)
                self.counters.rxDrop(.rxPolicyDrops)
            }
            self.raise(crossing, sa, hooks: hooks)
        case .consumed(let crossing):  // a TFC dummy packet: authenticated, then discarded
            self.counters.add(.espRX)
            self.pool.release(packet)
            self.raise(crossing, sa, hooks: hooks)
        case .dropped(let reason):
            self.pool.release(packet)
            switch reason {
            case .replayDuplicate, .replayTooOld, .sequenceZero: self.counters.rxDrop(.replayErrors)
            case .icvFailed: self.counters.rxDrop(.icvErrors)
            default: self.counters.rxDrop(.headerErrors)
            }
        case .expired:
            self.pool.release(packet)
            self.counters.rxDrop(.rxExpired)
        case .gone:
            self.deliverToHost(packet, OffloadMetadata(), hooks: hooks)  // no longer matched: ordinary traffic
        }
    }

    /// The device's IN (and FWD) policies, in SPD order: the first whose selector covers the inner flow decides;
    /// it must allow, and its template (if any) must be satisfied by the SA the packet came through.
    @inline(__always)
    private func inboundPolicyAccepts(_ packet: PacketBuffer, sa: SAEntry, snapshot: TableSnapshot) -> Bool {
        guard let flow = Flow.parse(packet.data, count: packet.count, ifindex: self.ifindex) else { return false }
        for p in snapshot.inPolicies where p.selector.matches(flow) {
            guard p.action == .allow else { return false }
            guard let t = p.template else { return true }
            return sa.satisfies(t) || t.optional
        }
        return false
    }

    // MARK: - Crypto offload

    @inline(__always)
    private func openCryptoOffload(_ packet: PacketBuffer, info: ESPPacketInfo, sa: SAEntry, hooks: Hooks) {
        enum Outcome {
            case opened(Bool)
            case unprocessed
        }
        let n = packet.count
        let outcome: Outcome = sa.state.withLock { s in
            guard !sa.deleted.load(ordering: .acquiring), let c = s.cipher?.cipher,
                info.udpEncapsulated == sa.encapsulated
            else { return .unprocessed }
            let espLength = n - info.espOffset
            let header = 8 + c.ivLength
            guard espLength >= header + c.icvLength + 2 else { return .unprocessed }
            let cryptLength = espLength - header - c.icvLength
            if c.blockSize > 4 && cryptLength % c.blockSize != 0 { return .unprocessed }
            let seq = s.esnTracker.inferSequence(info.sequence) ?? UInt64(info.sequence)
            let esnHigh: UInt32? = sa.esn ? UInt32(truncatingIfNeeded: seq >> 32) : nil
            let ok = c.open(esp: packet.data + info.espOffset, cryptLength: cryptLength, esnHigh: esnHigh)
            // A failed ICV is not counted per SA: the host sees cryptoSuccess == false and counts it (as with
            // mlx5, whose update_stats reports nothing for crypto offload); only the device-wide icv_errors has it.
            if ok {
                s.esnTracker.advance(seq)
                s.counters.packets &+= 1
                s.counters.bytes &+= UInt64(n)
                s.counters.inboundSequence = max(s.counters.inboundSequence, seq)
            }
            return .opened(ok)
        }
        var m = OffloadMetadata()
        if case .opened(let ok) = outcome {
            self.counters.add(.cryptoRX)
            if !ok { self.counters.add(.icvErrors) }
            m.handle = sa.handle
            m.cryptoDone = true
            m.cryptoSuccess = ok
        }
        // Malformed for the device, or the SA just went: the host sees the packet as it came.
        self.deliverToHost(packet, m, hooks: hooks)
    }

    // MARK: - Fragments

    /// True when an outer-fragmented ESP (or NAT-T) packet belongs to a device SA: by (destination, SPI) for a
    /// first fragment; by destination alone for the others, which carry no SPI.
    private func fragmentForDeviceSA(_ packet: PacketBuffer, snapshot: TableSnapshot) -> Bool {
        guard !snapshot.rxDestinations.isEmpty else { return false }
        let p = packet.data
        let n = packet.count
        var proto: UInt8
        var off: Int
        var first: Bool
        let destination: IPAddress
        switch p.loadByte(at: 0) >> 4 {
        case 4:
            guard let ip = IPv4Header.parse(p, available: n) else { return false }
            proto = ip.proto
            off = ip.headerLength
            first = p.loadBE16(at: 6) & IPv4Header.fragmentOffsetMask == 0
            destination = .loadV4(from: p, at: 16)
        case 6:
            guard n >= HeaderSize.ipv6 else { return false }
            destination = .loadV6(from: p, at: 24)
            proto = p.loadByte(at: 6)
            off = HeaderSize.ipv6
            first = true
            var hops = 0
            while IPv6Header.isExtensionHeader(proto) && hops < 16 {
                hops += 1
                guard off + 8 <= n else { return false }
                if proto == IPProtocolNumber.fragment {
                    first = p.loadBE16(at: off + 2) & 0xfff8 == 0
                    proto = p.loadByte(at: off)
                    off += 8
                    if !first { break }  // what follows is mid-payload, not headers
                } else {
                    let len = (Int(p.loadByte(at: off + 1)) + 1) * 8
                    proto = p.loadByte(at: off)
                    off += len
                }
            }
        default:
            return false
        }
        guard let kinds = snapshot.rxDestinations[destination] else { return false }
        if proto == IPProtocolNumber.esp {
            guard first else { return kinds & 1 != 0 }
            guard off + 4 <= n else { return kinds & 1 != 0 }
            return snapshot.rx[RXKey(destination: destination, spi: p.loadBE32(at: off))] != nil
        }
        if proto == IPProtocolNumber.udp {
            guard first else { return kinds & 2 != 0 }
            guard off + HeaderSize.udp + 4 <= n, p.loadBE16(at: off + 2) == 4500 else { return false }
            let spi = p.loadBE32(at: off + HeaderSize.udp)
            return spi != 0 && snapshot.rx[RXKey(destination: destination, spi: spi)] != nil
        }
        return false
    }
}
