import XFRMESP
import XFRMPacket

// Runs: consecutive packets of a batch that take exactly the same path share one acquisition of their SA's lock
// (≈ what the kernel's GSO segments of one skb get from xfrm_output). A run holds only packets whose per-packet
// path would have done nothing but ESP, accounting and the route's checks; it stops at the first packet that needs
// anything else, which then goes the per-packet way — so counters, events and verdicts come out exactly as if
// every packet had gone alone.

extension XFRMStack {
    /// The most bytes of packets one run protects under the SA's lock (≈ 5 µs of AES-GCM at 1,420 B: the
    /// control plane and the timers wait no longer than that for the SA).
    static let runByteLimit = 16_384

    /// Protects output packets `start…` that the memo's software bundle serves (same flow, same generation and
    /// tag: CPU, and `forwarded` as the memo's packet), inside the tunnel's size limit, in one acquisition of the
    /// SA's lock, and stores their verdicts.
    /// Returns the index of the first packet it did not decide (`start` when none).
    ///
    /// Per packet this is `outputCachedBundle` without the device branch: the direction check (once, the SA's
    /// config is immutable), the size check before the lock, the configuration generation, state, lifetime, ESP
    /// and accounting under it, the route's MTU check after. A packet the transform refused (sequence overflow)
    /// ends the run with its drop counted as `apply` counts it.
    func outputRun(_ batch: inout PacketBatch, from start: Int, memo: borrowing OutputMemo, cpu: UInt32,
                   forwarded: Bool, ifID: UInt32, now: UInt64) -> Int {
        guard start < batch.count, memo.isSet else { return start }
        let generation = self.currentGeneration
        let tag = self.outputTag(cpu: cpu, forwarded: forwarded)
        let stage: PacketBatch.Stage = forwarded ? .forward : .output
        return memo.withBundle { b -> Int in
            guard b.device == nil, b.sa.config.direction != .inbound, let transformRef = b.sa.transformRef else {
                return start
            }
            // The usual flow's packets are recognized by their raw bytes (`RawFlowKey`) and header checksum, which
            // is what `Flow.parse` and `matches` would find in them; others are parsed.
            let raw = memo.rawKey(tag: tag, generation: generation, ifID: ifID)
            return batch.packets.withUnsafeMutableBufferPointer { packets -> Int in
                // Which of the next packets the bundle serves, before the lock.
                var end = start
                var bytes = 0
                while end < packets.count {
                    guard case .pending = packets[end].verdict, packets[end].stage == stage else { break }
                    let buffer = packets[end].buffer
                    guard end == start || bytes + buffer.count <= Self.runByteLimit,
                        Self.isMemoFlow(buffer, raw: raw, memo: memo, tag: tag, generation: generation, ifID: ifID)
                    else { break }
                    if let limit = b.limit, buffer.count > limit { break }  // ICMP or a drop: the per-packet path
                    bytes += buffer.count
                    end += 1
                }
                guard end > start else { return start }
                let tfcPadTo = Self.tfcPadTo(b.sa, limit: b.limit)
                let (protected, refused) = transformRef._withUnsafeGuaranteedRef { transform in
                    b.sa.useForOutputRun(now: now, count: end - start) { k in
                        // As per packet: a configuration change since the memo was made sends the packet back
                        // to the lookups.
                        guard self.currentGeneration == generation else { return nil }
                        var layout = ESPLayout()
                        // The header was verified by Flow.parse above.
                        let reason = transform.encapsulate(&packets[start + k].buffer, layout: &layout,
                                                           innerHeaderChecked: true, tfcPadTo: tfcPadTo)
                        return (reason, layout.payloadLength)
                    }
                }
                for j in start..<(start + protected) {
                    let r = self.transmit(&packets[j].buffer, ifindex: b.ifindex, mtu: b.mtu, transformed: true,
                                           mayFragment: true)
                    packets[j].verdict = .output(r, transformed: true)
                }
                guard let refused else { return start + protected }
                self.statistics.count(refused)
                packets[start + protected].verdict = .output(.dropped(XfrmStatCounter(refused)), transformed: false)
                return start + protected + 1
            }
        }
    }

    /// Whether an output packet (mark 0, the batch's `ifID`) belongs to the memo's flow: its header verifies and its
    /// flow is the memo's — by the raw key when the memo has one (equal keys mean equal flows, `RawFlowKeyTests`;
    /// the key holds no if_id, which is one per batch), else parsed.
    @inline(__always)
    static func isMemoFlow(_ buffer: PacketBuffer, raw: RawFlowKey?, memo: borrowing OutputMemo, tag: UInt,
                           generation: UInt64, ifID: UInt32) -> Bool {
        let p = buffer.data
        let n = buffer.count
        if let raw, RawFlowKey(p, count: n, mark: 0, ifindex: 0) == raw {
            let ok = IPv4Header.checksumIsValid(p, headerLength: HeaderSize.ipv4Minimum)
            assert(ok == (Flow.parse(p, count: n, mark: 0).map { f in
                var f = f
                f.ifID = ifID
                return memo.matches(f, tag: tag, generation: generation)
            } == true), "a raw flow key disagrees with the parsed flow")
            return ok
        }
        guard var flow = Flow.parse(p, count: n, mark: 0) else { return false }
        flow.ifID = ifID
        return memo.matches(flow, tag: tag, generation: generation)
    }

    /// Opens received packets `start…` whose outermost layer is ESP for the memo's SA (to the same local outer
    /// destination, no device metadata) in one acquisition of the SA's lock, then finishes each one as `input` does
    /// after its outermost layer (nested layers, the policy check with the memo's verdict) and stores the verdicts.
    /// Returns the index of the first packet it did not decide (`start` when none).
    ///
    /// Per packet this is `input` with the lookups the memo already answered: the outer destination, the SAD
    /// lookup, the direction and larval checks (once, the SA's config is immutable), then under the lock the
    /// configuration generation, state, binding, lifetime, replay, ICV and decryption, accounting. A packet that
    /// needs anything else (another SA, another destination, a limit due) ends the run and goes the per-packet way;
    /// so does every packet after one whose inner packet may be ESP again (its nested layers, possibly through this
    /// same SA, must come before the next outer packet's, as one packet at a time orders them).
    func inputRun(_ batch: inout PacketBatch, from start: Int, memo: inout InputMemo, now: UInt64) -> Int {
        let generation = self.currentGeneration
        guard start < batch.count, let lent = memo.sa, let key = memo.saKeyHeld, key.mark == 0,
            key.id.proto == IPProtocolNumber.esp, let outer = memo.outer, let outerLocal = outer.local,
            memo.generation == generation
        else { return start }
        // Read once per run (per packet, `input` reads it again; a port change meanwhile is a race either way).
        let nattPort = self.nattPort.load(ordering: .relaxed)
        // Held for the run: the finish below validates the memo per packet, which may drop the memo's reference.
        let sa = lent.takeUnretainedValue()
        return withExtendedLifetime(sa) { () -> Int in
            // An SA with a set-mark changes the mark its packets are checked with: the per-packet way.
            guard sa.config.direction != .outbound, let transformRef = sa.transformRef, sa.markAfterInput(0) == 0
            else { return start }
            let tunnel = sa.config.mode == .tunnel
            let tag = UInt(bitPattern: Unmanaged.passUnretained(sa).toOpaque())  // = secpath.identity(0)
            let known = Self.knownInnerFlow(memo, tag: tag, nattPort: nattPort)
            // The SA's destination as the usual packet's outer header holds it (nil: IPv6, or not the memo's).
            let v4Destination: UInt32? = if case .v4(let d) = key.id.destination, outer.destination == key.id.destination {
                d
            } else {
                nil
            }
            let taken = transformRef._withUnsafeGuaranteedRef { transform -> Int in
                batch.packets.withUnsafeMutableBufferPointer { packets -> Int in
                    var bytes = 0
                    return sa.useForInputRun(now: now, count: packets.count - start) { k in
                        let j = start + k
                        guard k == 0 || bytes + packets[j].buffer.count <= Self.runByteLimit,
                            case .pending = packets[j].verdict,
                            packets[j].stage == .input, packets[j].metadata == nil,
                            self.currentGeneration == generation,
                            let info = Self.usualOuterESP(packets[j].buffer, spi: key.id.spi, destination: v4Destination,
                                                      nattPort: nattPort)
                                ?? Self.outerESP(&packets[j].buffer, nattPort: nattPort, destination: outer.destination),
                            info.spi == key.id.spi && info.destination == key.id.destination,
                            // A NAT-T peer at a new address or port: the per-packet path tells the key manager.
                            Self.peerMoved(packets[j].buffer, info: info, transform: transform,
                                           peer: sa.config.source) == nil
                        else { return .stop }
                        bytes += packets[j].buffer.count
                        var carried = 0
                        if let reason = transform.decapsulate(&packets[j].buffer, info: info, cryptoDone: false,
                                                              carried: &carried) {
                            self.statistics.count(reason)
                            packets[j].verdict = .input(.dropped(reason == .tfcDummy ? nil : XfrmStatCounter(reason)),
                                                        decapsulated: false)
                            return .refused(reason, countedBytes: carried)
                        }
                        // What ESP delivered, as `inputLayer` counts it.
                        let n = packets[j].buffer.count
                        let counted = tunnel ? carried : n - info.transportOffset
                        // The memo's flow again, as the finish below would find first (`rawMemoVerdict`): its
                        // verdict now, while the packet is in the cache. Its key says it is not ESP again.
                        if let known, n >= HeaderSize.ipv4Minimum + HeaderSize.udp,
                            self.inputIfID(sa.ifID) == known.ifID,
                            RawFlowKey(packets[j].buffer.data, count: n, mark: 0, ifindex: packets[j].ifindex)
                                == known.raw
                        {
                            assert(Flow.parse(packets[j].buffer.data, count: n, mark: 0, ifindex: packets[j].ifindex,
                                              verifyChecksum: false)
                                .map { f in var f = f; f.ifID = known.ifID; return f.sameFlow(known.flow) } == true,
                                   "a raw flow key matched another flow")
                            let r = known.local ? .deliver : self.forwardPrepare(&packets[j].buffer)
                            packets[j].verdict = .input(r, decapsulated: true)
                            return .opened(countedBytes: counted)
                        }
                        return Self.cannotBeESP(packets[j].buffer, nattPort: nattPort)
                            ? .opened(countedBytes: counted) : .openedLast(countedBytes: counted)
                    }
                }
            }
            batch.packets.withUnsafeMutableBufferPointer { packets in
                for j in start..<(start + taken) {
                    guard case .pending = packets[j].verdict else { continue }  // refused or decided above
                    // As `input` does per packet; the SA stays alive through `sa` even if this resets the memo.
                    memo.validate(self.currentGeneration)
                    let ifindex = packets[j].ifindex
                    // Every packet but the last was opened with `.opened`: `cannotBeESP` said so, which is what
                    // `inputLayers` would find before its policy check — whose first step, the memo's raw verdict,
                    // comes first here.
                    let opened = j < start + taken - 1
                    if opened, let r = self.rawMemoVerdict(&packets[j].buffer, tag: tag, ifID: self.inputIfID(sa.ifID),
                                                           ifindex: ifindex, mark: 0, memo: memo) {
                        packets[j].verdict = .input(r, decapsulated: true)
                        continue
                    }
                    var secpath = SecPath()
                    _ = secpath.appendLent(Unmanaged.passUnretained(sa))
                    if opened {
                        let r = self.policyCheck(&packets[j].buffer, secpath: secpath, ifindex: ifindex, mark: 0,
                                                 now: now, localIfindex: nil, memo: &memo)
                        packets[j].verdict = .input(r, decapsulated: true)
                        continue
                    }
                    var decapsulated = false
                    let r = self.inputLayers(&packets[j].buffer, secpath: &secpath, ifindex: ifindex, mark: 0,
                                             metadata: nil, cryptoDone: false, outerLocal: .some(.some(outerLocal)),
                                             now: now, decapsulated: &decapsulated, memo: &memo)
                    packets[j].verdict = .input(r, decapsulated: decapsulated)
                }
            }
            return start + taken
        }
    }

    /// `classify` of a packet a run may take: ESP (raw or in UDP) to the memo's outer destination, else nil.
    @inline(__always)
    static func outerESP(_ packet: inout PacketBuffer, nattPort: UInt16, destination: IPAddress) -> ESPPacketInfo? {
        guard Self.destination(of: packet) == destination,
            case .esp(let info) = ESPClassification.classify(&packet, nattPort: nattPort)
        else { return nil }
        return info
    }

    /// What `ESPClassification.classify` finds in the usual received packet of a run, without its general parse:
    /// an IPv4 packet with a 20-byte header whose checksum verifies, exactly as long as its total length, not a
    /// fragment, to `destination`, carrying ESP with this SPI either raw or in UDP to `nattPort` (RFC 3948) with a
    /// UDP length that ends where the packet does. Nil for anything else, which `outerESP` then classifies in full
    /// (the same answer for these packets: `OuterESPTests` compares them). The SPI is never 0, so a packet taken
    /// here is neither IKE (the non-ESP marker) nor a keepalive (one byte).
    @inline(__always)
    static func usualOuterESP(_ packet: PacketBuffer, spi: UInt32, destination: UInt32?, nattPort: UInt16)
        -> ESPPacketInfo?
    {
        let p = packet.data
        let n = packet.count
        guard spi != 0, let destination, n >= HeaderSize.ipv4Minimum + 8, p.loadByte(at: 0) == 0x45,
            Int(p.loadBE16(at: 2)) == n, p.loadBE32(at: 16) == destination,
            p.loadBE16(at: 6) & (IPv4Header.flagMF | IPv4Header.fragmentOffsetMask) == 0
        else { return nil }
        let esp: Int
        switch p.loadByte(at: 9) {
        case IPProtocolNumber.esp: esp = HeaderSize.ipv4Minimum
        case IPProtocolNumber.udp:
            esp = HeaderSize.ipv4Minimum + HeaderSize.udp
            guard n >= esp + 8, p.loadBE16(at: 22) == nattPort, Int(p.loadBE16(at: 24)) == n - HeaderSize.ipv4Minimum
            else { return nil }
        default: return nil
        }
        guard p.loadBE32(at: esp) == spi, IPv4Header.checksumIsValid(p, headerLength: HeaderSize.ipv4Minimum)
        else { return nil }
        return ESPPacketInfo(
            ipVersion: 4, source: .v4(p.loadBE32(at: 12)), destination: .v4(destination),
            transportOffset: HeaderSize.ipv4Minimum, espOffset: esp, nextHeaderFieldOffset: 9,
            udpEncapsulated: esp != HeaderSize.ipv4Minimum, spi: spi, sequence: p.loadBE32(at: esp + 4))
    }

    /// The inner flow the memo's verdict is for, when a run may apply it inside its locked section: a verdict for
    /// a flow through `tag`'s SA with a raw key (IPv4 TCP or UDP, 20-byte header), whose packets are certainly not
    /// ESP again (TCP, or UDP to another port than NAT-T's). The memo does not change during the locked section,
    /// and every packet there is checked against the generation the verdict was made in; so a packet with this
    /// key gets the verdict the finish would give it, as `rawMemoVerdict` gives it. (With the configuration
    /// changing while the batch runs, such a packet keeps the verdict of the generation it was opened in, while an
    /// earlier packet of the run finished later may already see the next one: each verdict is still that of a
    /// configuration current while its packet was processed, as for packets on two workers.)
    @inline(__always)
    static func knownInnerFlow(_ memo: borrowing InputMemo, tag: UInt, nattPort: UInt16?)
        -> (raw: RawFlowKey, ifID: UInt32, local: Bool, flow: Flow)?
    {
        guard let m = memo.verdict, m.tag == tag, let raw = m.raw, raw.mark == 0,
            m.flow.proto == IPProtocolNumber.tcp
                || (m.flow.proto == IPProtocolNumber.udp && m.flow.destinationPort != nattPort)
        else { return nil }
        return (raw, m.flow.ifID, m.decision.local, m.flow)
    }

    /// Whether a decapsulated packet is certainly not ESP again (no nested layer to open): IPv4 per
    /// `ESPClassification.isPlainIPv4`; IPv6 of exactly its payload length whose next header is TCP, ICMPv6, or UDP
    /// to another port than NAT-T's — a packet `classify` calls `.notESP`. False means "may be" (extension headers,
    /// other protocols, odd lengths), never "is".
    @inline(__always)
    static func cannotBeESP(_ packet: PacketBuffer, nattPort: UInt16?) -> Bool {
        if ESPClassification.isPlainIPv4(packet, nattPort: nattPort) { return true }
        let p = packet.data
        let n = packet.count
        guard n >= 40, p.loadByte(at: 0) >> 4 == 6, Int(p.loadBE16(at: 4)) + 40 == n else { return false }
        switch p.loadByte(at: 6) {
        case IPProtocolNumber.tcp, IPProtocolNumber.icmpv6: return true
        case IPProtocolNumber.udp:
            guard let port = nattPort else { return true }
            return n >= 48 && p.loadBE16(at: 42) != port
        default: return false
        }
    }
}
