// The input path (≈ xfrm_input, __xfrm_policy_check): classification, SAD lookup, ESP under the SA's lock,
// nested decapsulation, then the IN/FWD policy check against the secpath. The pipeline is in XFRMStack.swift's
// header.

import Foundation
import Synchronization
import XFRMCrypto
import XFRMESP
import XFRMPacket

/// The SAs a received packet came through, outermost first (≈ struct sec_path; at most XFRM_MAX_DEPTH = 6).
///
/// Entries are unretained references. One the secpath keeps alive itself (`append`) is marked in `owned` and released
/// with the secpath; a lent one (`appendLent`: the outermost SA, which the input memo holds for the packet's whole
/// input) costs no reference count.
struct SecPath: ~Copyable {
    private var entries: (Unmanaged<SecurityAssociation>?, Unmanaged<SecurityAssociation>?,
                          Unmanaged<SecurityAssociation>?, Unmanaged<SecurityAssociation>?,
                          Unmanaged<SecurityAssociation>?, Unmanaged<SecurityAssociation>?) = (nil, nil, nil, nil, nil, nil)
    private(set) var count = 0
    /// Bit i: entry i was retained by `append` and is released in deinit.
    private var owned: UInt8 = 0
    static let capacity = 6

    deinit {
        guard self.owned != 0 else { return }
        for i in 0..<self.count where self.owned & (1 << i) != 0 { self.entry(i).release() }
    }

    /// Appends `sa`, retained by the secpath; false when the secpath is full.
    mutating func append(_ sa: SecurityAssociation) -> Bool {
        guard self.count < Self.capacity else { return false }
        self.owned |= 1 << self.count
        self.put(Unmanaged.passRetained(sa))
        return true
    }

    /// Appends an SA the caller keeps alive for as long as the secpath lives, unretained; false when full.
    @inline(__always)
    mutating func appendLent(_ sa: Unmanaged<SecurityAssociation>) -> Bool {
        guard self.count < Self.capacity else { return false }
        self.put(sa)
        return true
    }

    private mutating func put(_ e: Unmanaged<SecurityAssociation>) {
        switch self.count {
        case 0: self.entries.0 = e
        case 1: self.entries.1 = e
        case 2: self.entries.2 = e
        case 3: self.entries.3 = e
        case 4: self.entries.4 = e
        default: self.entries.5 = e
        }
        self.count += 1
    }

    @inline(__always)
    private func entry(_ i: Int) -> Unmanaged<SecurityAssociation> {
        switch i {
        case 0: return self.entries.0!
        case 1: return self.entries.1!
        case 2: return self.entries.2!
        case 3: return self.entries.3!
        case 4: return self.entries.4!
        default: return self.entries.5!
        }
    }

    subscript(i: Int) -> SecurityAssociation { self.entry(i).takeUnretainedValue() }

    /// Runs `body` with entry `i` borrowed (no reference count): the secpath or the memo that lent it keeps it.
    @inline(__always)
    func with<R>(_ i: Int, _ body: (SecurityAssociation) -> R) -> R {
        self.entry(i)._withUnsafeGuaranteedRef(body)
    }

    /// Entry `i`'s identity (the input cache's tag).
    @inline(__always)
    func identity(_ i: Int) -> UInt { UInt(bitPattern: self.entry(i).toOpaque()) }
}

extension XFRMStack {
    // MARK: - Input path

    /// Runs a received IP packet (from interface `ifindex`) through ESP decapsulation and the inbound policy check.
    public func input(_ packet: inout PacketBuffer, ifindex: Int32 = 0, mark: UInt32 = 0,
                      metadata: OffloadMetadata? = nil) -> InputResult {
        var decapsulated = false
        return self.input(&packet, ifindex: ifindex, mark: mark, metadata: metadata, decapsulated: &decapsulated)
    }

    /// `input`, also saying whether the delivered or forwarded packet came out of ESP (a non-empty secpath, or a
    /// packet-offload device's decryption): a daemon writes only those into its TUN.
    public func input(_ packet: inout PacketBuffer, ifindex: Int32 = 0, mark: UInt32 = 0,
                      metadata: OffloadMetadata? = nil, decapsulated: inout Bool) -> InputResult {
        var memo = InputMemo()
        return self.input(&packet, ifindex: ifindex, mark: mark, metadata: metadata, now: self.clock.now,
                          decapsulated: &decapsulated, memo: &memo)
    }

    /// `input` with what the previous packets of a batch looked up (outer destination, SA, inner verdict), reused
    /// while the configuration generation holds. `now`: the clock, read once per batch.
    func input(_ packet: inout PacketBuffer, ifindex: Int32, mark: UInt32, metadata: OffloadMetadata?, now: UInt64,
               decapsulated: inout Bool, memo: inout InputMemo) -> InputResult {
        decapsulated = false
        var secpath = SecPath()
        memo.validate(self.currentGeneration)
        let cryptoDone = metadata?.cryptoDone ?? false
        if let m = metadata, m.packetOffloaded {
            // Packet offload RX: the device decrypted, checked replay and its copy of the IN policy; the software
            // ESP and policy checks are skipped (≈ __xfrm_policy_check's PACKET branch). A failed status drops.
            guard m.cryptoDone && m.cryptoSuccess else {
                self.statistics.increment(.inError)
                return .dropped(.inError)
            }
            guard let flow = Flow.parse(packet.data, count: packet.count, mark: mark, ifindex: ifindex) else {
                self.statistics.increment(.inHdrError)
                return .dropped(.inHdrError)
            }
            decapsulated = true
            return self.network.isLocal(flow.destination) ? .deliver : self.forwardPrepare(&packet)
        }
        // A packet for another host is transit traffic whatever it carries (ESP, NAT-T, IKE, fragments): it goes
        // straight to the forward policy check, never to our SAD or NAT-T demux.
        // The outer destination's local interface, looked up once: it also serves the policy check of a packet
        // that turns out not to be ESP (its destination is the same).
        let outerLocal = Self.destination(of: packet).map { d -> Int32? in
            if let m = memo.outer, m.destination == d { return m.local }
            let local = self.network.localInterface(owning: d)
            memo.outer = (d, local)
            return local
        }
        if !cryptoDone, let outerLocal, outerLocal == nil {
            return self.policyCheck(&packet, secpath: secpath, ifindex: ifindex, mark: mark, now: now,
                                    localIfindex: .some(nil), memo: &memo)
        }
        return self.inputLayers(&packet, secpath: &secpath, ifindex: ifindex, mark: mark, metadata: metadata,
                                cryptoDone: cryptoDone, outerLocal: outerLocal, now: now, decapsulated: &decapsulated,
                                memo: &memo)
    }

    /// `input` from the classification on, for a packet addressed to this host (or of unknown destination): each
    /// ESP layer through its SA, outermost first, then the policy check. `secpath` holds the layers already
    /// removed (a batch run hands over packets whose outermost layer it removed); `outerLocal` is the outer
    /// destination's local interface when known.
    @inline(__always)
    func inputLayers(_ packet: inout PacketBuffer, secpath: inout SecPath, ifindex: Int32, mark: UInt32,
                     metadata: OffloadMetadata?, cryptoDone: Bool, outerLocal: Int32??, now: UInt64,
                     decapsulated: inout Bool, memo: inout InputMemo) -> InputResult {
        var cryptoDone = cryptoDone
        // The packet's mark as each layer's set-mark leaves it (a batch run hands over packets whose first layer's
        // set-mark is none).
        var mark = mark
        while true {
            let nattPort = self.nattPort.load(ordering: .relaxed)
            // The usual decapsulated packet (IPv4, neither ESP nor NAT-T) is plain by its protocol alone: the policy
            // check, as `.notESP` below, without classifying it in full.
            if secpath.count > 0 && ESPClassification.isPlainIPv4(packet, nattPort: nattPort) {
                decapsulated = true
                return self.policyCheck(&packet, secpath: secpath, ifindex: ifindex, mark: mark, now: now,
                                        localIfindex: nil, memo: &memo)
            }
            // After a decapsulation the header is the one the ESP transform verified or rewrote a moment ago.
            var classification = ESPClassification.classify(&packet, nattPort: nattPort,
                                                             verifyChecksum: secpath.count == 0)
            if secpath.count > 0 {
                classification = self.innerDemux(classification, packet, secpath: secpath)
            }
            switch classification {
            case .ike:
                if secpath.count > 0, let refused = self.decapsulatedIKECheck(packet, secpath: secpath, mark: mark,
                                                                              ifindex: ifindex) {
                    return refused
                }
                return .ike
            case .drop(let reason):
                self.statistics.count(reason)
                return .dropped(reason == .nattKeepalive ? nil : XfrmStatCounter(reason))
            case .notESP:
                decapsulated = secpath.count > 0
                return self.policyCheck(&packet, secpath: secpath, ifindex: ifindex, mark: mark, now: now,
                                        localIfindex: secpath.count == 0 ? outerLocal : nil, memo: &memo)
            case .esp(let info):
                let id = SAID(destination: info.destination, spi: info.spi, proto: IPProtocolNumber.esp)
                let done = cryptoDone
                cryptoDone = false  // only the outermost ESP was handled by the device
                if secpath.count == 0 {
                    // The outermost SA: the memo's (one SAD lookup per batch and SPI), lent to the secpath. The memo
                    // is written only here, before it lends the SA, so its reference keeps the SA alive until this
                    // packet is done even if the SAD drops it meanwhile.
                    if !memo.holdsSA(id, mark: mark) { memo.setSA(id, mark: mark, self.states.lookup(id, mark: mark)) }
                    guard let lent = memo.sa else {
                        self.statistics.count(.noState)
                        return .dropped(.inNoStates)
                    }
                    if let verdict = lent._withUnsafeGuaranteedRef({
                        self.inputLayer($0, &packet, info: info, metadata: metadata, cryptoDone: done, now: now)
                    }) {
                        return verdict
                    }
                    _ = secpath.appendLent(lent)
                    mark = lent._withUnsafeGuaranteedRef { $0.markAfterInput(mark) }
                } else {
                    // ≈ xfrm_input's XFRM_MAX_DEPTH check, before the lookup: a layer the secpath could not hold is
                    // not decrypted (no replay advance, no lifetime use).
                    guard secpath.count < SecPath.capacity else {
                        self.statistics.increment(.inBufferError)
                        return .dropped(.inBufferError)
                    }
                    // A nested layer looks up without the memo and keeps its SA in the secpath.
                    guard let sa = self.states.lookup(id, mark: mark) else {
                        self.statistics.count(.noState)
                        return .dropped(.inNoStates)
                    }
                    if let verdict = self.inputLayer(sa, &packet, info: info, metadata: metadata, cryptoDone: done,
                                                     now: now) {
                        return verdict
                    }
                    guard secpath.append(sa) else {
                        self.statistics.increment(.inBufferError)
                        return .dropped(.inBufferError)
                    }
                    mark = sa.markAfterInput(mark)
                }
            }
        }
    }

    /// What a decapsulated packet's classification means (≈ the inner packet going through the IP layer again
    /// after xfrm_input): only a packet for this host reaches the ESP, NAT-T and IKE demultiplexing; one for another
    /// host is forwarded whatever it carries (the FWD policy check), so a peer cannot make this host open a nested
    /// layer, with any SA it knows the key of, for someone else. An inner fragment is plain traffic (the kernel would
    /// reassemble a local one before its transport sees it; here it goes to the policy check as it is, as forwarded
    /// fragments do) — never a drop.
    @inline(__always)
    func innerDemux(_ c: ESPClassification, _ packet: PacketBuffer, secpath: borrowing SecPath)
        -> ESPClassification
    {
        switch c {
        case .notESP:
            return c
        case .drop(.fragmented):
            return .notESP
        case .esp, .ike, .drop:
            guard let d = Self.destination(of: packet), self.network.localInterface(owning: d) != nil else {
                return .notESP
            }
            return c
        }
    }

    /// IKE that came out of an ESP layer, for this host: ≈ udp_queue_rcv_one_skb's xfrm4_policy_check with the IKE
    /// socket's bypass policy (what a key manager sets on its sockets) — every SA of the secpath must cover the
    /// flow (XfrmInStateMismatch), and a tunnel-mode SA meets a policy without templates (XfrmInTmplMismatch). Nil
    /// when the packet may go to the key manager.
    func decapsulatedIKECheck(_ packet: PacketBuffer, secpath: borrowing SecPath, mark: UInt32, ifindex: Int32)
        -> InputResult?
    {
        guard var flow = Flow.parse(packet.data, count: packet.count, mark: mark, ifindex: ifindex,
                                    verifyChecksum: false)
        else {
            self.statistics.increment(.inHdrError)
            return .dropped(.inHdrError)
        }
        flow.ifindex = self.network.localInterface(owning: flow.destination) ?? 0
        for i in 0..<secpath.count where !secpath[i].config.selector.covers(flow) {
            self.statistics.increment(.inStateMismatch)
            return .dropped(.inStateMismatch)
        }
        if Self.nonTransport(secpath, from: 0) {
            self.statistics.increment(.inTmplMismatch)
            return .dropped(.inTmplMismatch)
        }
        return nil
    }

    /// One ESP layer of `input` through `sa`: the direction and larval checks, then the SA's locked section (state,
    /// lifetime, replay, ICV, decryption, accounting). nil when the packet was decapsulated and goes on; otherwise
    /// its verdict, counted.
    @inline(__always)
    private func inputLayer(_ sa: SecurityAssociation, _ packet: inout PacketBuffer, info: ESPPacketInfo,
                            metadata: OffloadMetadata?, cryptoDone done: Bool, now: UInt64) -> InputResult? {
        // ≈ xfrm_input: the direction right after the lookup, then the state under the lock.
        if sa.config.direction == .outbound {
            self.statistics.increment(.inStateDirError)
            return .dropped(.inStateDirError)
        }
        guard let transform = sa.transformRef else {
            // A larval SA (ALLOCSPI gave it this SPI; the key manager has not filled it in yet).
            self.statistics.increment(.acquireError)
            return .dropped(.acquireError)
        }
        return transform._withUnsafeGuaranteedRef {
            self.inputLayer(sa, $0, &packet, info: info, metadata: metadata, cryptoDone: done, now: now)
        }
    }

    /// `inputLayer` with the SA's transform borrowed.
    @inline(__always)
    private func inputLayer(_ sa: SecurityAssociation, _ transform: ESPTransform, _ packet: inout PacketBuffer,
                            info: ESPPacketInfo, metadata: OffloadMetadata?, cryptoDone done: Bool,
                            now: UInt64) -> InputResult? {
        let tunnel = sa.config.mode == .tunnel
        // The UDP source port of a NAT-T packet that came from elsewhere than the SA's peer (≈ the check in
        // esp_input_done2), told to the key manager once the packet has proven itself.
        var movedTo: (new: UInt16, old: UInt16)? = nil
        // One acquisition of the SA's lock for the whole packet (≈ xfrm_input's x->lock section).
        let use = sa.useForInput(now: now, metadata: metadata, cryptoDone: done,
                                 screen: { transform.screen(info) }) {
            movedTo = Self.peerMoved(packet, info: info, transform: transform, peer: sa.config.source)
            var carried = 0
            let r = transform.decapsulate(&packet, info: info, cryptoDone: done, carried: &carried)
            // Only a packet that proved itself counts against the rate limit (XFRMA_MTIMER_THRESH).
            if let m = movedTo, r == nil || r == .tfcDummy,
                !transform.mappingDue(port: m.new, now: now, maxAge: sa.config.mappingMaxAge)
            {
                movedTo = nil
            }
            // ≈ xfrm_input after x->type->input: curlft counts what ESP delivered — the inner packet with any TFC
            // padding in tunnel mode, the upper-layer payload in transport mode — not the outer ESP packet.
            return (r, tunnel ? carried : packet.count - info.transportOffset)
        }
        switch use {
        case .packetOffloaded:
            // A packet-offload SA is used only by its device, never in software (spec §7).
            self.statistics.increment(.inStateInvalid)
            return .dropped(.inStateInvalid)
        case .mismatch:
            // The device decrypted with another SA than the one found here: trust nothing.
            self.statistics.increment(.inStateMismatch)
            return .dropped(.inStateMismatch)
        case .notValid(let larval):
            self.statistics.increment(larval ? .acquireError : .inStateInvalid)
            return .dropped(larval ? .acquireError : .inStateInvalid)
        case .hardExpired:
            self.expireHard(sa)
            self.statistics.increment(.inStateExpired)
            return .dropped(.inStateExpired)
        case .deviceICVFailed(let soft):
            // Crypto offload RX: the device found the ICV bad.
            if soft { self.events.publish(.expire(sa, hard: false)) }
            self.statistics.count(.icvFailed)
            return .dropped(.inStateProtoError)
        case .used(let reason, let soft, let highMoved, let bound):
            if soft { self.events.publish(.expire(sa, hard: false)) }
            // ≈ xfrm_replay_advance_esn → xdo_dev_state_advance_esn: a crypto-offload device tracks the high
            // half.
            if done && highMoved && sa.config.esn, let o = bound, let dev = self.device(ifindex: o.ifindex),
                dev.callbacks.contains(.advanceESN) {
                dev.advanceESN(sa, offload: o)
            }
            // Told once the packet proved itself, as esp_input_done2 tells it before acting on the next header: a
            // TFC dummy packet (next header 59) from the new endpoint counts too.
            if let ports = movedTo, reason == nil || reason == .tfcDummy {
                self.events.publish(.mapping(sa, newSource: info.source, newPort: ports.new, oldPort: ports.old))
            }
            if let reason {
                self.statistics.count(reason)
                return .dropped(reason == .tfcDummy ? nil : XfrmStatCounter(reason))
            }
            return nil
        }
    }

    /// The UDP source port of a NAT-T packet (`info`, before its decapsulation) that did not come from the SA's
    /// `peer` address and port, with the SA's port (its current NAT-T ports, `transform`'s: run under the SA's
    /// lock); nil when it did, or for raw ESP (≈ esp_input_done2 comparing the source with x->props.saddr and
    /// encap_sport).
    @inline(__always)
    static func peerMoved(_ packet: PacketBuffer, info: ESPPacketInfo, transform: ESPTransform, peer: IPAddress)
        -> (new: UInt16, old: UInt16)?
    {
        guard info.udpEncapsulated, let e = transform.encapsulation else { return nil }
        let port = packet.data.loadBE16(at: info.transportOffset)
        return port != e.sourcePort || info.source != peer ? (port, e.sourcePort) : nil
    }

    /// The verdict memo's answer for a packet that came through exactly one SA (`tag`, its identity; `ifID`, its
    /// if_id now — `updateState` may change it) when the packet has the memo's raw flow key (`RawFlowKey`) and the
    /// memo's if_id; nil: ask `policyCheck`.
    @inline(__always)
    func rawMemoVerdict(_ packet: inout PacketBuffer, tag: UInt, ifID: UInt32, ifindex: Int32, mark: UInt32,
                        memo: borrowing InputMemo) -> InputResult? {
        guard let m = memo.verdict, m.tag == tag, m.flow.ifID == ifID, let raw = m.raw,
            RawFlowKey(packet.data, count: packet.count, mark: mark, ifindex: ifindex) == raw
        else { return nil }
        assert(Flow.parse(packet.data, count: packet.count, mark: mark, ifindex: ifindex, verifyChecksum: false)
            .map { f in var f = f; f.ifID = ifID; return f.sameFlow(m.flow) } == true,
               "a raw flow key matched another flow")
        return m.decision.local ? .deliver : self.forwardPrepare(&packet)
    }

    /// ≈ __xfrm_policy_check: the packet (after any decapsulation) must have come through the SAs its IN or FWD
    /// policy requires, and every one of those SAs must cover the inner flow with its selector.
    /// `localIfindex`, when known (.some), is the packet destination's local interface (nil: not local).
    func policyCheck(_ packet: inout PacketBuffer, secpath: borrowing SecPath, ifindex: Int32, mark: UInt32,
                             now: UInt64, localIfindex known: Int32?? = nil, memo: inout InputMemo) -> InputResult {
        // The SA's identity as the tag of the verdict memo and the input cache: safe because an SA leaves the SAD
        // only with a generation bump, so no entry outlives it into a time when its address could belong to
        // another SA.
        let cacheTag = secpath.count == 1 ? secpath.identity(0) : 0
        // A flow that came through one SA and was allowed before, in this configuration generation, is allowed
        // again without the lookups below (the verdict depends only on the flow, the SA and the configuration);
        // the usual packet is recognized by its raw bytes, without parsing its flow.
        if cacheTag != 0, let r = self.rawMemoVerdict(&packet, tag: cacheTag,
                                                      ifID: self.inputIfID(secpath.with(0) { $0.ifID }),
                                                      ifindex: ifindex, mark: mark, memo: memo) {
            return r
        }
        // After a decapsulation the inner IPv4 header was verified (tunnel mode) or rewritten with its checksum
        // (transport mode) by the ESP transform a moment ago: one checksum per header, as ip_rcv does.
        guard var flow = Flow.parse(packet.data, count: packet.count, mark: mark, ifindex: ifindex,
                                    verifyChecksum: secpath.count == 0)
        else {
            self.statistics.increment(.inHdrError)
            return .dropped(.inHdrError)
        }
        // The traffic's if_id is the innermost SA's (≈ xfrmi_decode_session finding the XFRM interface by
        // x->if_id; on a host whose interfaces are known, only when one has it); packets that came through no SA,
        // or through SAs without an if_id, have if_id 0.
        if secpath.count > 0 { flow.ifID = self.inputIfID(secpath.with(secpath.count - 1) { $0.ifID }) }
        let generation = memo.generation
        if cacheTag != 0, let m = memo.verdict, m.tag == cacheTag, m.flow.sameFlow(flow) {
            return m.decision.local ? .deliver : self.forwardPrepare(&packet)
        }
        if cacheTag != 0, let (hit, touch) = self.inputCache.lookup(flow, tag: cacheTag, generation: generation,
                                                                  now: now) {
            let d = hit.value
            if touch { self.policies.markUsed(index: d.policyIndex, direction: d.direction, at: now) }
            memo.verdict = (flow, RawFlowKey(packet.data, count: packet.count, mark: mark, ifindex: ifindex),
                            cacheTag, d)
            return d.local ? .deliver : self.forwardPrepare(&packet)
        }
        let cacheKey = flow
        // ≈ decode_session's flowi_oif from skb_dst: a selector's `dev` is the device of the local route (the one
        // holding the address) for local traffic and the route's output device for forwarded traffic — for the
        // SA selectors below as for the policy lookup.
        let localIfindex = known ?? self.network.localInterface(owning: flow.destination)
        let local = localIfindex != nil
        flow.ifindex = localIfindex ?? self.network.egress(to: flow.destination)?.ifindex ?? 0
        // An ICMP error is also judged by the packet it quotes (≈ xfrm_icmp_flow_decode); a verdict reached that way
        // depends on more than the flow and is not cached.
        var quotedDecided = false
        // A peer may only inject traffic its SAs' selectors allow: without this, one SA's holder could send inner
        // addresses belonging to another SA whenever the policy is wider than the SA selectors. An SA with flag
        // `icmp` also lets through an ICMP error whose quoted packet, reversed, its selector covers
        // (≈ xfrm_selector_inner_icmp_match): a router inside the tunnel reporting on the SA's own traffic.
        for i in 0..<secpath.count where !secpath[i].config.selector.covers(flow) {
            if secpath[i].config.flags & SAConfig.icmpFlag != 0,
                let quoted = flow.quotedReverse(packet.data, count: packet.count),
                secpath[i].config.selector.covers(quoted)
            {
                quotedDecided = true
                continue
            }
            self.statistics.increment(.inStateMismatch)
            return .dropped(.inStateMismatch)
        }
        let direction: PolicyDirection = local ? .inbound : .forward
        // ≈ __xfrm_check_nopolicy: no policy in this direction and no secpath — the default decides, no lookup.
        var policy = secpath.count == 0 && self.policies.count(direction) == 0
            ? nil : self.policies.lookup(direction, flow, usedAt: now)
        // ≈ xfrm_in_fwd_icmp (Linux 6.8): a forwarded ICMP error no FWD policy takes is judged by the FWD policy of
        // the flow it quotes, reversed — so a plaintext error about protected traffic meets that policy's templates.
        if policy == nil, direction == .forward, self.policies.count(.forward) != 0,
            let quoted = flow.quotedReverse(packet.data, count: packet.count)
        {
            policy = self.policies.lookup(.forward, quoted, usedAt: now)
            quotedDecided = policy != nil
        }
        guard let policy else {
            // No policy: with a blocking default the packet is XfrmInNoPols; otherwise a tunnel-mode SA in the
            // secpath still needs one (XfrmInNoPols), unless a crypto-offload device decrypted it.
            if self.defaultAction(direction) == .block {
                self.statistics.increment(.inNoPols)
                return .dropped(.inNoPols)
            }
            let cryptoOffloaded = secpath.count > 0 && secpath[secpath.count - 1].offload?.type == .crypto
            if !cryptoOffloaded && Self.nonTransport(secpath, from: 0) {
                self.statistics.increment(.inNoPols)
                return .dropped(.inNoPols)
            }
            return local ? .deliver : self.forwardPrepare(&packet)
        }
        if policy.action == .block {
            self.statistics.increment(.inPolBlock)
            return .dropped(.inPolBlock)
        }
        // Template check: templates are applied innermost first on output, so the secpath (outermost first) meets
        // them from the last template backwards (≈ the loop over xfrm_policy_ok in __xfrm_policy_check).
        var k = 0
        var t = policy.templates.count - 1
        while t >= 0 {
            guard let next = Self.templateConsumes(policy.templates[t], secpath, from: k, flow: flow) else {
                self.statistics.increment(.inTmplMismatch)
                return .dropped(.inTmplMismatch)
            }
            k = next
            t -= 1
        }
        // SAs the policy did not ask for: tunnel-mode ones are a mismatch (transport extras are tolerated).
        if Self.nonTransport(secpath, from: k) {
            self.statistics.increment(.inTmplMismatch)
            return .dropped(.inTmplMismatch)
        }
        if cacheTag != 0 && !quotedDecided {
            self.inputCache.store(
                InputCache.Entry(flow: cacheKey, tag: cacheTag, generation: generation,
                                 value: InputDecision(local: local, policyIndex: policy.index, direction: direction)),
                now: now)
        }
        return local ? .deliver : self.forwardPrepare(&packet)
    }

    /// ≈ xfrm_policy_ok: where the secpath check continues after template `t`, starting at entry `start`, or nil
    /// on a mismatch. An optional transport template consumes nothing; otherwise non-matching transport-mode
    /// entries are skipped until a matching entry (consumed) or a non-matching tunnel entry (a mismatch for a
    /// required template; an optional one then consumes nothing).
    static func templateConsumes(_ t: Template, _ sp: borrowing SecPath, from start: Int, flow: Flow) -> Int? {
        if t.optional && t.mode == 0 { return start }
        var i = start
        while i < sp.count {
            if Self.templateMatches(t, sp[i], flow: flow) { return i + 1 }
            if sp[i].config.mode != .transport { break }
            i += 1
        }
        return t.optional ? start : nil
    }

    /// ≈ secpath_has_nontransport: a tunnel-mode SA at or after `start`.
    static func nonTransport(_ sp: borrowing SecPath, from start: Int) -> Bool {
        var i = start
        while i < sp.count {
            if sp[i].config.mode != .transport { return true }
            i += 1
        }
        return false
    }

    /// The destination address of an IP packet, if its header is long enough to have one.
    @inline(__always)
    public static func destination(of packet: PacketBuffer) -> IPAddress? {
        let p = packet.data
        guard packet.count >= 20 else { return nil }
        switch p.loadByte(at: 0) >> 4 {
        case 4: return .loadV4(from: p, at: 16)
        case 6: return packet.count >= 40 ? .loadV6(from: p, at: 24) : nil
        default: return nil
        }
    }

    /// ≈ xfrm_state_ok: does this SA satisfy the template? (On input a template's reqid 0 matches any SA, and the
    /// SA's if_id must be the traffic's when the traffic has one.)
    static func templateMatches(_ t: Template, _ sa: SecurityAssociation, flow: Flow) -> Bool {
        let c = sa.config
        guard c.id.proto == t.proto, t.spi == 0 || t.spi == c.id.spi, t.reqid == 0 || t.reqid == c.reqid,
            c.mode == (t.mode == 1 ? .tunnel : .transport), flow.ifID == 0 || sa.ifID == flow.ifID
        else { return false }
        if c.mode == .tunnel {
            if let d = t.destination, d != c.id.destination { return false }
            if let s = t.source, s != c.source { return false }
        }
        return true
    }

    /// Forwarding: TTL / hop limit decrement (a packet at TTL 1 is dropped).
    func forwardPrepare(_ packet: inout PacketBuffer) -> InputResult {
        let p = packet.data
        if p.loadByte(at: 0) >> 4 == 4 {
            let ttl = p.loadByte(at: 8)
            guard ttl > 1 else { return .dropped(nil) }
            IPv4Header.decrementTTL(p)
        } else {
            let hl = p.loadByte(at: 7)
            guard hl > 1 else { return .dropped(nil) }
            p.storeByte(hl - 1, at: 7)
        }
        return .forward
    }
}
