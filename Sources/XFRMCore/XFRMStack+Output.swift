// The output path (≈ xfrm_lookup, xfrm_tmpl_resolve, xfrm_output): OUT policy lookup or the flow's cached
// bundle, SA resolution and acquire, ESP under the SA's lock, packet-offload hand-off. The pipeline is in
// XFRMStack.swift's header.

import Foundation
import Synchronization
import XFRMCrypto
import XFRMESP
import XFRMPacket

extension XFRMStack {
    // MARK: - Output path

    /// The tag a flow's cached bundle is kept under beside the flow: with per-CPU SAs a flow's bundle depends on the
    /// CPU too (≈ the kernel's per-CPU state cache), so each CPU keeps its own entry (without them every CPU shares
    /// one); and a forwarded packet's flow is kept apart from a local one's (an IPv6 policy lookup sees the route's
    /// interface only for a forwarded packet).
    @inline(__always)
    func outputTag(cpu: UInt32, forwarded: Bool) -> UInt {
        (self.states.hasPerCPUStates ? UInt(cpu) &+ 1 &<< 4 : 0) | (forwarded ? 1 &<< 63 : 0)
    }

    /// Runs a locally generated (or, with `forwarded`, a routed) IP packet through the OUT policy and its SAs, then
    /// routes it. See the pipeline at the top of this file.
    /// `ifID` is the XFRM interface id the traffic was routed into (0: ordinary traffic; only policies with that
    /// exact if_id apply). `cpu` is the CPU the output runs on — the engine worker's index — which picks among
    /// per-CPU SAs (RFC 9611, `pcpu-num`); callers outside an engine run on CPU 0.
    public func output(_ packet: inout PacketBuffer, mark: UInt32 = 0, ifID: UInt32 = 0, forwarded: Bool = false,
                       cpu: UInt32 = 0) -> OutputResult
    {
        var transformed = false
        return self.output(&packet, mark: mark, ifID: ifID, forwarded: forwarded, cpu: cpu, transformed: &transformed)
    }

    /// `output`, also saying whether an SA transformed the packet: a `.transmit` with `transformed` false is the
    /// packet as it came (no policy, a bypass policy, only optional templates without SAs) — what a daemon whose
    /// outer side carries nothing but ESP must not send.
    public func output(_ packet: inout PacketBuffer, mark: UInt32 = 0, ifID: UInt32 = 0, forwarded: Bool = false,
                       cpu: UInt32 = 0, transformed: inout Bool) -> OutputResult
    {
        var memo = OutputMemo()
        return self.output(&packet, mark: mark, ifID: ifID, forwarded: forwarded, cpu: cpu, now: self.clock.now,
                           transformed: &transformed, memo: &memo)
    }

    /// `output` with the bundle of the previous packet of a batch: a packet of the same flow, in the same
    /// configuration generation, goes straight to it (no cache lookup); `memo` is updated for the next packet.
    /// `now`: the clock, read once per batch.
    ///
    /// The bundle's first SA that dies before the packet takes its lock, or before the device takes it in packet
    /// offload (a key manager's rekey deleting it in between), sends the still untouched packet through the
    /// lookups once more (`retryOf`: that template's index), where the SA that replaced it is found. The kernel
    /// drops such a packet as XfrmOutStateInvalid (XfrmOutError in packet offload; its socket's next packet finds
    /// the bundle stale); so does the second pass when that template finds no SA (no ACQUIRE, no XfrmOutNoStates,
    /// an optional template not skipped) or its SA dies too.
    func output(_ packet: inout PacketBuffer, mark: UInt32, ifID: UInt32, forwarded: Bool, cpu: UInt32, now: UInt64,
                transformed: inout Bool, memo: inout OutputMemo, retryOf: Int? = nil) -> OutputResult
    {
        transformed = false
        guard var flow = Flow.parse(packet.data, count: packet.count, mark: mark) else {
            self.statistics.count(.badOutputPacket)
            return .dropped(.outError)
        }
        flow.ifID = ifID
        // A cached bundle's SA that died since the cache lookup (a change would have missed the cache) is the same
        // race: the lookups below are then that second pass.
        var retryOf = retryOf
        let generation = self.currentGeneration
        let tag = self.outputTag(cpu: cpu, forwarded: forwarded)
        if memo.matches(flow, tag: tag, generation: generation) {
            // The memo holds its bundle strongly; borrowing it here costs no reference count per packet.
            let r = memo.withBundle { self.outputCachedBundle(&packet, $0, now: now, transformed: &transformed) }
            if let r { return r }
            memo.clear()  // the SA is no longer valid: resolve again below
            retryOf = 0
        }
        if let (hit, touch) = self.outputCache.lookup(flow, tag: tag, generation: generation, now: now) {
            switch hit.value {
            case .plain(let ifindex, let mtu):
                return self.transmit(&packet, ifindex: ifindex, mtu: mtu, transformed: false, mayFragment: true)
            case .packetOffload(let policyIndex, let sa, let device, let offload, let limit):
                if touch { self.policies.markUsed(index: policyIndex, direction: .outbound, at: now) }
                // nil: the SA died since the entry was made (the device refused it): resolve again below.
                if let r = self.packetOffloadChecks(&packet, sa: sa, device: device, offload: offload, limit: limit,
                                                    retryIfInvalid: retryOf == nil) { return r }
                retryOf = 0
            case .bundle(let policyIndex, let bundle):
                if touch { self.policies.markUsed(index: policyIndex, direction: .outbound, at: now) }
                memo.set(flow, packet: packet, tag: tag, generation: generation, bundle: bundle)
                if let r = self.outputCachedBundle(&packet, bundle, now: now, transformed: &transformed) { return r }
                memo.clear()
                retryOf = 0  // the SA is no longer valid: resolve again below
            }
        }
        // ≈ flowi_oif, which policy selectors with `dev IFNAME` and the larval SA's selector see: the interface the
        // route leads to for IPv4 (the route lookup writes it into the flow, ip_route_output_key_hash_rcu) and for a
        // forwarded packet of either family (xfrm_decode_session takes the route's device); 0 for a locally
        // generated IPv6 packet, whose flow keeps the oif its socket gave it (ip6_dst_lookup_flow does not set it;
        // an unbound socket's is 0: tests/e2e/test_kernel_acquire.py sees it in the kernel's larval SA).
        let cacheKey = flow
        let route = self.network.egress(to: flow.destination)
        flow.ifindex = flow.version == 4 || forwarded ? route?.ifindex ?? 0 : 0
        var policy = self.policies.lookup(.outbound, flow, usedAt: now)
        // ≈ icmp_route_lookup and xfrm_out_fwd_icmp (XFRM_LOOKUP_ICMP): an ICMP error no policy takes is looked up
        // again as the flow it quotes, reversed — the way back along the traffic it reports on — and a policy
        // with flag `icmp` found so protects it with that flow's SAs. Such a verdict depends on the quote: nothing
        // about an ICMP error is cached.
        let icmpError = flow.isICMPError
        if policy == nil, icmpError, var quoted = flow.quotedReverse(packet.data, count: packet.count) {
            quoted.ifindex = flow.ifindex
            if let p = self.policies.lookup(.outbound, quoted, usedAt: now), p.flags & Policy.icmpFlag != 0 {
                policy = p
                flow = quoted
            }
        }
        if let policy {
            if policy.action == .block {
                self.statistics.increment(.outPolBlock)
                return .dropped(.outPolBlock)
            }
            if let po = policy.offload {
                if let r = self.outputPacketOffload(&packet, flow: flow, cacheKey: cacheKey, tag: tag, policy: policy,
                                                    device: po.ifindex, mark: mark, cpu: cpu, generation: generation,
                                                    now: now, retried: retryOf != nil) { return r }
                // The SA it found died before the device took the packet: once more, as for the other modes.
                return self.output(&packet, mark: mark, ifID: ifID, forwarded: forwarded, cpu: cpu, now: now,
                                   transformed: &transformed, memo: &memo, retryOf: 0)
            }
            var crypto: (OffloadMetadata, Int32)? = nil
            let single = policy.templates.count == 1
            var cacheable: (sa: SecurityAssociation, device: (any XfrmOffloadDevice, StateOffload)?)? = nil
            // ≈ xfrm_tmpl_resolve_one: a transport template takes its addresses from the flow or from the previous
            // tunnel's endpoints; a tunnel template from itself, its missing source from the route (xfrm_get_saddr).
            var daddr = flow.destination
            var saddr = flow.source
            var applied = 0
            for (index, template) in policy.templates.enumerated() {
                guard let (source, destination) = self.templateAddresses(template, daddr: daddr, saddr: saddr) else {
                    self.statistics.increment(.outPolError)  // no route to the tunnel's peer: no source address
                    return .dropped(.outPolError)
                }
                let query = StateQuery(
                    template: template, flow: flow, source: source, destination: destination,
                    policyMark: policy.mark.value & policy.mark.mask, ifID: policy.ifID, cpu: cpu,
                    cpuAcquire: policy.flags & Policy.cpuAcquireFlag != 0)
                var resolution = self.states.resolve(query)
                // ≈ xfrm_state_find's state cache: with XFRM_POLICY_CPU_ACQUIRE only the CPU's own SA is remembered.
                var stopgap = false
                if case .found(let sa) = resolution, query.cpuAcquire, sa.config.pcpuNum != cpu { stopgap = true }
                if case .fallback(let sa) = resolution {
                    // ≈ xfrm_state_find with XFRM_POLICY_CPU_ACQUIRE: ask for this CPU's SA, meanwhile use `sa`
                    // (not cached: the CPU's own SA is to take over).
                    self.acquire(template, flow: flow, policy: policy, source: source, destination: destination,
                                 pcpu: cpu)
                    resolution = .found(sa)
                    stopgap = true
                }
                switch resolution {
                case .fallback: fatalError("resolved above")
                case .found(let sa):
                    daddr = destination
                    saddr = source
                    applied += 1
                    // Crypto offload: a single-transform bundle whose route leads to the SA's device, if the device
                    // takes the packet; otherwise the SA silently works in software (≈ xfrm_dev_offload_ok).
                    if single, let o = sa.offload, o.type == .crypto, let dev = self.device(ifindex: o.ifindex),
                        let egress = self.network.egress(to: sa.id.destination), egress.ifindex == o.ifindex,
                        let transform = sa.transform,
                        Self.cryptoOffloadTakes(packet, transform: transform, mtu: egress.mtu,
                                          tunnel: sa.config.mode == .tunnel),
                        !dev.callbacks.contains(.offloadOK) || dev.offloadOK(packet, sa: sa, offload: o)
                    {
                        var layout = ESPLayout()
                        switch self.apply(sa, to: &packet, now: now, deviceLayout: &layout,
                                          limit: self.transportLimit(sa, single: single, flow: flow, route: route),
                                          retryIfInvalid: applied == 1 && retryOf == nil) {
                        case .stale:
                            return self.output(&packet, mark: mark, ifID: ifID, forwarded: forwarded, cpu: cpu,
                                               now: now, transformed: &transformed, memo: &memo, retryOf: index)
                        case .done(let r): return r
                        case .next: break
                        }
                        // ≈ xfrm_replay_overflow_offload_esn: the high half moved on, so the device must learn it.
                        if sa.config.esn && layout.sequence & 0xffff_ffff == 0 { dev.advanceESN(sa, offload: o) }
                        var meta = OffloadMetadata()
                        meta.espOffset = layout.espOffset
                        meta.cryptLength = layout.cryptLength
                        meta.esnHigh = layout.esnHigh
                        meta.handle = o.handle
                        crypto = (meta, o.ifindex)
                        if !stopgap && !icmpError { cacheable = (sa, (dev, o)) }
                        continue
                    }
                    // A software SA's bundle is cached; a crypto-offload SA that went to software for this packet
                    // is not (the device may take the next one).
                    if single && sa.offload == nil && !stopgap && !icmpError { cacheable = (sa, nil) }
                    var unused = ESPLayout()
                    switch self.apply(sa, to: &packet, now: now, deviceLayout: &unused, seal: true,
                                      limit: self.transportLimit(sa, single: single, flow: flow, route: route),
                                      retryIfInvalid: applied == 1 && retryOf == nil,
                                      outermost: index == policy.templates.count - 1) {
                    case .stale:
                        return self.output(&packet, mark: mark, ifID: ifID, forwarded: forwarded, cpu: cpu, now: now,
                                           transformed: &transformed, memo: &memo, retryOf: index)
                    case .done(let r): return r
                    case .next: break
                    }
                case .acquiring where retryOf == index, .none where retryOf == index:
                    // The SA this template found a moment ago died and nothing replaced it: as the first pass would
                    // have counted it.
                    self.statistics.increment(.outStateInvalid)
                    return .dropped(.outStateInvalid)
                case .acquiring:
                    if template.optional { continue }
                    self.statistics.increment(.outNoStates)
                    return .dropped(.outNoStates)
                case .none:
                    // xfrm_state_find queries the key manager for optional templates too; the packet then goes on
                    // without that transform.
                    self.acquire(template, flow: flow, policy: policy, source: source, destination: destination)
                    if template.optional { continue }
                    self.statistics.increment(.outNoStates)
                    return .dropped(.outNoStates)
                }
            }
            if let (meta, ifindex) = crypto {
                let r = self.transmit(&packet, transformed: true, mayFragment: false)  // the device seals it
                guard case .transmit(let out) = r else { return r }
                if out == ifindex {
                    transformed = true  // ESP-framed for the device, which seals it
                    if let c = cacheable { self.cacheBundle(c.sa, device: c.device, flow: flow, key: cacheKey,
                                                            tag: tag, policy: policy, generation: generation,
                                                            now: now) }
                    return .offload(ifindex: ifindex, metadata: meta)
                }
                self.statistics.increment(.outError)
                return .dropped(.outError)
            }
            transformed = applied > 0
            let r = self.transmit(&packet, transformed: applied > 0, mayFragment: true)
            if case .transmit = r, applied == 1, let c = cacheable {
                self.cacheBundle(c.sa, device: nil, flow: flow, key: cacheKey, tag: tag, policy: policy,
                                 generation: generation, now: now)
            }
            return r
        } else if self.defaultAction(.outbound) == .block && !self.network.isLocal(flow.destination) {
            // ≈ xfrm_lookup_with_ifid: the sender gets EPERM and no counter moves; loopback traffic is exempt.
            return .dropped(nil)
        }
        guard let route else { return .dropped(nil) }
        if icmpError {
            return self.transmit(&packet, ifindex: route.ifindex, mtu: route.mtu, transformed: false, mayFragment: true)
        }
        self.outputCache.store(
            OutputCache.Entry(flow: cacheKey, tag: tag, generation: generation,
                              value: .plain(ifindex: route.ifindex, mtu: route.mtu)),
            now: now)
        return self.transmit(&packet, ifindex: route.ifindex, mtu: route.mtu, transformed: false, mayFragment: true)
    }

    /// The packet checks of xfrm_dev_offload_ok for crypto offload: a plain IP header (no IPv4 options, no IPv6
    /// extension header right after it), and ESP leaving the packet within `mtu` (≈ skb->len against
    /// xfrm_state_mtu, whose net_adj keeps a transport-mode packet's IP header out of the block rounding). A packet
    /// that fails is not given to the device, which could not fragment what it seals: the SA protects it in
    /// software, and an IPv4 one without DF leaves as fragments.
    @inline(__always)
    static func cryptoOffloadTakes(_ packet: PacketBuffer, transform: ESPTransform, mtu: Int, tunnel: Bool) -> Bool {
        let p = packet.data
        let first = p.loadByte(at: 0)
        let version = Int(first >> 4)
        if version == 4 {
            guard first & 0x0f == 5 else { return false }
        } else {
            guard packet.count >= HeaderSize.ipv6, !Self.isIPv6ExtensionHeader(p.loadByte(at: 6)) else { return false }
        }
        return packet.count <= (tunnel ? transform.maximumPayload(forMTU: mtu)
            : Self.transportLimit(version: version, transform: transform, mtu: mtu))
    }

    /// The length a tunnel SA pads inner packets to for traffic flow confidentiality (RFC 4303 §2.4): its `tfcpad`,
    /// but never past the largest inner packet its path takes after ESP (`limit`), so the padding alone never makes
    /// a packet too big (≈ esp_output: min(x->tfcpad, xfrm_state_mtu(x, child_mtu_cached))); 0 for none. Only
    /// software ESP pads: an SA with `tfcpad` cannot be offloaded (xfrm_dev_state_add refuses it, as the user API
    /// does here).
    @inline(__always)
    static func tfcPadTo(_ sa: SecurityAssociation, limit: Int?) -> Int {
        let pad = sa.config.tfcPad
        guard pad != 0, let limit else { return 0 }
        return min(Int(pad), limit)
    }

    /// The largest packet a transport-mode SA leaves within `mtu` (≈ xfrm_state_mtu: net_adj, the size of a plain
    /// IPv4 or IPv6 header, stays outside the block rounding).
    @inline(__always)
    static func transportLimit(version: Int, transform: ESPTransform, mtu: Int) -> Int {
        let header = version == 4 ? HeaderSize.ipv4Minimum : HeaderSize.ipv6
        return transform.maximumPayload(forMTU: mtu - header) + header
    }

    /// A transport-mode SA alone in its bundle: its limit on the flow's route (the route to the SA's destination,
    /// which is the flow's); nil otherwise (a tunnel checks its own path, a longer bundle is not checked here).
    @inline(__always)
    func transportLimit(_ sa: SecurityAssociation, single: Bool, flow: Flow,
                        route: (ifindex: Int32, mtu: Int)?) -> Int? {
        guard single, sa.config.mode == .transport, let route, let transform = sa.transform else { return nil }
        return Self.transportLimit(version: flow.version, transform: transform, mtu: route.mtu)
    }

    /// IPv6's minimum link MTU (RFC 8200 §5): never reported smaller in a Packet Too Big.
    static let ipv6MinimumMTU = IPv6Header.minimumMTU

    /// ≈ ipv6_ext_hdr, what xfrm_dev_offload_ok refuses to a device: hop-by-hop, routing, fragment, AH, no next
    /// header, destination options, mobility (`IPv6Header.isExtensionHeader` is the input walk's, without AH and
    /// no next header).
    @inline(__always)
    static func isIPv6ExtensionHeader(_ next: UInt8) -> Bool {
        switch next {
        case 0, 43, 44, 51, 59, 60, 135: true
        default: false
        }
    }

    /// Packet offload TX (≈ xfrm_output_one's PACKET branch + xfrm_dev_offload_ok): no ESP work, no sequence
    /// number, no SA accounting on the host — checks only, then the plaintext goes to the device. Whatever the
    /// device cannot take is dropped as XfrmOutError, never sent in software and never in clear. Nil (only when
    /// not `retried`): the SA found died before the device took the packet (a rekey deleting it in between), and
    /// the caller looks up once more; on that second pass no SA, or a dead one, is XfrmOutError as on the first.
    func outputPacketOffload(_ packet: inout PacketBuffer, flow: Flow, cacheKey: Flow, tag: UInt,
                                     policy: Policy, device: Int32, mark: UInt32, cpu: UInt32, generation: UInt64,
                                     now: UInt64, retried: Bool) -> OutputResult? {
        guard let template = policy.templates.first else {
            // An offloaded allow policy without templates: plaintext through the device.
            return self.transmit(&packet, mayFragment: true)
        }
        guard let (source, destination) = self.templateAddresses(template, daddr: flow.destination,
                                                                 saddr: flow.source) else {
            self.statistics.increment(.outPolError)
            return .dropped(.outPolError)
        }
        let sa: SecurityAssociation
        var cacheable = true
        let query = StateQuery(template: template, flow: flow, source: source, destination: destination,
                               policyMark: policy.mark.value & policy.mark.mask, ifID: policy.ifID,
                               packetOffloadDevice: device, cpu: cpu,
                               cpuAcquire: policy.flags & Policy.cpuAcquireFlag != 0)
        switch self.states.resolve(query) {
        case .found(let s):
            sa = s
            cacheable = !query.cpuAcquire || s.config.pcpuNum == cpu
        case .fallback(let s):
            self.acquire(template, flow: flow, policy: policy, source: source, destination: destination,
                         offload: StateOffload(ifindex: device, direction: .outbound, type: .packet), pcpu: cpu)
            sa = s
            cacheable = false
        case .acquiring where retried, .none where retried:
            // The SA found a moment ago died and nothing replaced it: as the first pass would have counted it.
            self.statistics.increment(.outError)
            return .dropped(.outError)
        case .acquiring:
            self.statistics.increment(.outNoStates)
            return .dropped(.outNoStates)
        case .none:
            self.acquire(template, flow: flow, policy: policy, source: source, destination: destination,
                         offload: StateOffload(ifindex: device, direction: .outbound, type: .packet))
            self.statistics.increment(.outNoStates)
            return .dropped(.outNoStates)
        }
        guard let o = sa.offload, o.type == .packet, let dev = self.device(ifindex: o.ifindex),
            let transform = sa.transform
        else {
            if !retried && sa.state != .valid { return nil }  // deleted (unbound) since the lookup
            self.statistics.increment(.outError)
            return .dropped(.outError)
        }
        let routeTo = sa.config.mode == .tunnel ? sa.id.destination : flow.destination
        guard let iface = self.network.egress(to: routeTo), iface.ifindex == o.ifindex else {
            self.statistics.increment(.outError)  // the route leads to another device
            return .dropped(.outError)
        }
        let tunnel = sa.config.mode == .tunnel
        let limit = tunnel ? transform.maximumPayload(forMTU: iface.mtu)
            : Self.transportLimit(version: flow.version, transform: transform, mtu: iface.mtu)
        if cacheable {
            self.outputCache.store(
                OutputCache.Entry(flow: cacheKey, tag: tag, generation: generation,
                                  value: .packetOffload(policyIndex: policy.index, sa: sa, device: dev, offload: o,
                                                        limit: limit)),
                now: now)
        }
        return self.packetOffloadChecks(&packet, sa: sa, device: dev, offload: o, limit: limit,
                                        retryIfInvalid: !retried)
    }

    /// The per-packet part of packet offload TX (≈ xfrm_dev_offload_ok): what the device cannot take is dropped as
    /// XfrmOutError — IPv4 options, IPv6 extension headers, more than the SA's MTU (a packet that may not be
    /// fragmented answers with ICMP) — and the driver's offload_ok has the last word.
    /// Nil (only with `retryIfInvalid`) when the driver refused a packet because the SA died meanwhile: the caller
    /// looks up again.
    @inline(__always)
    func packetOffloadChecks(_ packet: inout PacketBuffer, sa: SecurityAssociation,
                                     device: any XfrmOffloadDevice, offload o: StateOffload, limit: Int,
                                     retryIfInvalid: Bool) -> OutputResult? {
        let p = packet.data
        let v4 = p.loadByte(at: 0) >> 4 == 4
        if v4 ? p.loadByte(at: 0) & 0x0f != 5 : Self.isIPv6ExtensionHeader(p.loadByte(at: 6)) {
            self.statistics.increment(.outError)  // IPv4 options or IPv6 extension headers
            return .dropped(.outError)
        }
        if packet.count > limit {
            // The stack never fragments for the device. A packet that may not be fragmented gets ICMP with the
            // bundle's MTU, as ip_forward sends it against the bundle's dst (tunnel and transport mode alike; IPv6
            // never below 1,280).
            let df = !v4 || p.loadBE16(at: 6) & IPv4Header.flagDF != 0
            let mtu = v4 ? limit : max(limit, Self.ipv6MinimumMTU)
            // The ICMP answer counts no xfrm_stat (ip_forward's, FragFails in Linux); a drop is XfrmOutError.
            if df && packet.count > mtu && self.makePacketTooBig(&packet, mtu: mtu) { return .icmpError }
            self.statistics.increment(.outError)
            return .dropped(.outError)
        }
        if device.callbacks.contains(.offloadOK) && !device.offloadOK(packet, sa: sa, offload: o) {
            if retryIfInvalid && sa.state != .valid { return nil }
            self.statistics.increment(.outError)
            return .dropped(.outError)
        }
        var meta = OffloadMetadata()
        meta.handle = o.handle
        return .offload(ifindex: o.ifindex, metadata: meta)
    }

    /// Applies one SA of a bundle; nil to continue, or the final result. `limit` is the largest packet the path takes
    /// after ESP (nil: a tunnel looks its route up; transport mode checks only a one-SA bundle's, which its caller
    /// passes). `retryIfInvalid` (a cached bundle, or a bundle's first SA on the first pass): an SA that is no longer
    /// valid gives `.stale` instead of a drop, with the packet untouched, so that the caller resolves again.
    /// `outermost`: no SA of the bundle comes after this one, so its TFC padding (`tfcPadTo`) may fill the route's
    /// MTU. The kernel caps an inner SA's padding at the MTU left by the SAs after it (child_mtu_cached); those are
    /// not resolved yet when this one applies, so an inner SA does not pad (README, "Known gaps").
    @inline(__always)
    func apply(_ sa: SecurityAssociation, to packet: inout PacketBuffer, now: UInt64,
                       deviceLayout: inout ESPLayout, seal: Bool = false, limit cachedLimit: Int? = nil,
                       retryIfInvalid: Bool = false, outermost: Bool = true) -> ApplyOutcome {
        guard let transform = sa.transformRef else {
            self.statistics.increment(.outStateInvalid)
            return .done(.dropped(.outStateInvalid))
        }
        return transform._withUnsafeGuaranteedRef {
            self.apply(sa, $0, to: &packet, now: now, deviceLayout: &deviceLayout, seal: seal, limit: cachedLimit,
                       retryIfInvalid: retryIfInvalid, outermost: outermost)
        }
    }

    /// `apply` with the SA's transform borrowed.
    @inline(__always)
    private func apply(_ sa: SecurityAssociation, _ transform: ESPTransform, to packet: inout PacketBuffer,
                       now: UInt64, deviceLayout: inout ESPLayout, seal: Bool, limit cachedLimit: Int?,
                       retryIfInvalid: Bool, outermost: Bool) -> ApplyOutcome {
        // ≈ xfrm_tmpl_resolve_one since Linux 6.10: xfrm_state_find does not look at an SA's direction, so the best
        // SA for a template may be a `dir in` one; the packet is then refused (-EINVAL), not sent elsewhere and not
        // acquired for.
        if sa.config.direction == .inbound {
            self.statistics.increment(.outStateDirError)
            return .done(.dropped(.outStateDirError))
        }
        // Tunnel mode: the largest inner packet the path takes after ESP (≈ xfrm_state_mtu of the route's MTU).
        let tunnelLimit = sa.config.mode != .tunnel ? nil : cachedLimit ?? self.network.egress(to: sa.id.destination)
            .map({ transform.maximumPayload(forMTU: $0.mtu) })
        // An inner packet that would not fit it is refused with ICMP when it may not be fragmented (IPv4 DF, or any
        // IPv6), ≈ xfrm4_tunnel_check_size / xfrm6_tunnel_check_size, which run before the SA's lock is taken.
        if let limit = tunnelLimit, packet.count > limit {
            let p = packet.data
            let v4DF = p.loadByte(at: 0) >> 4 == 4 && p.loadBE16(at: 6) & IPv4Header.flagDF != 0
            // IPv6 never reports less than its minimum MTU (xfrm6_tunnel_check_size): up to 1,280 bytes go on.
            let v6 = p.loadByte(at: 0) >> 4 == 6 && packet.count > Self.ipv6MinimumMTU
            if v4DF || v6 {
                // ≈ xfrm4_tunnel_check_size failing in the outer mode output: XfrmOutStateModeError.
                self.statistics.increment(.outStateModeError)
                let mtu = v6 ? max(limit, Self.ipv6MinimumMTU) : limit
                return .done(self.makePacketTooBig(&packet, mtu: mtu) ? .icmpError : .dropped(.outStateModeError))
            }
        }
        // Transport mode, a one-SA bundle (the caller passes its limit; the packet is still the sender's): its MTU is
        // the path's less what ESP adds (≈ xfrm_mtu, the MTU of the bundle's dst). A packet over it that may not be
        // fragmented gets ICMP with that MTU, as ip_forward / ip6_forward send it against the bundle's dst before any
        // XFRM work (no xfrm_stat counter: Linux counts it as FragFails), instead of being sealed and then dropped
        // for its size.
        if sa.config.mode == .transport, let limit = cachedLimit, packet.count > limit {
            let p = packet.data
            let v6 = p.loadByte(at: 0) >> 4 == 6
            let mtu = v6 ? max(limit, Self.ipv6MinimumMTU) : limit  // as ip6_forward, never below 1,280
            if v6 ? packet.count > mtu : p.loadBE16(at: 6) & IPv4Header.flagDF != 0 {
                if self.makePacketTooBig(&packet, mtu: mtu) { return .done(.icmpError) }
                self.statistics.increment(.outError)
                return .done(.dropped(.outError))
            }
        }
        let tfcPadTo = outermost ? Self.tfcPadTo(sa, limit: tunnelLimit) : 0
        // One acquisition of the SA's lock: state, lifetime, sequence number and ESP, accounting.
        let use = sa.useForOutput(now: now) {
            // The header was verified by Flow.parse at the start of output, or written by the previous SA.
            let reason = seal ? transform.encapsulate(&packet, layout: &deviceLayout, innerHeaderChecked: true,
                                                      tfcPadTo: tfcPadTo)
                : transform.encapsulateForDevice(&packet, layout: &deviceLayout, innerHeaderChecked: true)
            return (reason, deviceLayout.payloadLength)
        }
        switch use {
        case .notValid:
            if retryIfInvalid { return .stale }
            self.statistics.increment(.outStateInvalid)
            return .done(.dropped(.outStateInvalid))
        case .hardExpired:
            self.expireHard(sa)
            self.statistics.increment(.outStateExpired)
            return .done(.dropped(.outStateExpired))
        case .used(let reason, let soft):
            if soft {
                self.events.publish(.expire(sa, hard: false))
                // A dying SA gives way to a fresh one at the next resolution: cached bundles resolve again.
                self.configurationChanged()
            }
            if let reason {
                self.statistics.count(reason)
                return .done(.dropped(XfrmStatCounter(reason)))
            }
            return .next
        }
    }

    /// Routes and transmits a packet (no XFRM work): MTU check against the outgoing interface.

    /// The (local, remote) addresses an output template is resolved with (≈ the top of xfrm_tmpl_resolve_one's
    /// loop): transport mode takes `saddr`/`daddr` (the flow's, or the previous tunnel's endpoints); tunnel mode
    /// takes the template's, a missing source from the route toward the destination (xfrm_get_saddr). nil when
    /// there is no route to take a source from.
    @inline(__always)
    func templateAddresses(_ t: Template, daddr: IPAddress, saddr: IPAddress) -> (IPAddress, IPAddress)? {
        guard t.mode == 1 else { return (saddr, daddr) }
        let remote = t.destination ?? daddr
        if let local = t.source, !local.isUnspecified { return (local, remote) }
        guard let egress = self.network.egress(to: remote),
            let local = self.network.sourceAddress(ifindex: egress.ifindex, version: remote.version)
        else { return nil }
        return (local, remote)
    }

    /// ≈ xfrm_state_find's acquire branch: a larval SA (expires in 30 s) and an ACQUIRE to the key manager. As in
    /// xfrm_init_tempstate: the selector is the flow with full prefixes, port masks 0xffff and the output
    /// interface; the SA is `dir out` and takes the policy's mark and if_id. When no key manager listens for
    /// ACQUIRE (km_query fails), no larval SA is left behind. `pcpu`: the CPU a per-CPU acquire asks for (only with
    /// XFRM_POLICY_CPU_ACQUIRE while another SA carries the flow, as xfrm_state_find sets it); the larval SA and
    /// the ACQUIRE carry it (XFRMA_SA_PCPU).
    func acquire(_ template: Template, flow: Flow, policy: Policy, source: IPAddress, destination: IPAddress,
                         offload: StateOffload? = nil, pcpu: UInt32? = nil) {
        let seq = self.acquireSequence.wrappingAdd(1, ordering: .relaxed).newValue
        var lifetime = LifetimeConfig()
        lifetime.hardAddExpiresSeconds = Self.acquireExpirySeconds
        let full = flow.version == 4 ? UInt8(32) : 128
        let selector = Selector(
            family: flow.version, source: IPPrefix(flow.source, length: full),
            destination: IPPrefix(flow.destination, length: full), proto: flow.proto,
            sourcePort: flow.sourcePort, sourcePortMask: 0xffff,
            destinationPort: flow.destinationPort, destinationPortMask: 0xffff, ifindex: flow.ifindex)
        var config = SAConfig(
            id: SAID(destination: destination, spi: 0, proto: template.proto), source: source, selector: selector,
            reqid: template.reqid, mode: template.mode == 1 ? .tunnel : .transport, mark: policy.mark,
            ifID: policy.ifID, direction: .outbound, lifetime: lifetime, crypto: nil, kmSequence: seq)
        config.pcpuNum = pcpu
        let larval = try! SecurityAssociation(config, addTime: self.clock.now)
        // A packet-offload policy's larval SA is offered to its device first (≈ xdo_dev_state_add with
        // XFRM_DEV_OFFLOAD_FLAG_ACQ); a device that refuses it leaves no larval SA and sends no ACQUIRE.
        if var o = offload {
            o.acquire = true
            guard let dev = self.device(ifindex: o.ifindex), dev.callbacks.contains(.stateAdd) else { return }
            do throws(DeviceError) {
                o.handle = try dev.stateAdd(larval, offload: o)
            } catch {
                return
            }
            larval.setOffload(o)
        }
        // km_query after the device add, as xfrm_state_find orders them: with no listener the larval SA goes,
        // from the device too.
        guard self.events.hasAcquireListeners else {
            self.releaseFromDevice(larval)
            return
        }
        self.states.insertLarval(larval)
        self.events.publish(.acquire(state: larval, template: template, policy: policy))
    }
}

/// What applying one SA of a bundle came to.
enum ApplyOutcome {
    /// Protected: go on with the next template.
    case next
    /// The packet's fate (a drop, an ICMP error).
    case done(OutputResult)
    /// The SA is no longer valid (asked for with `retryIfInvalid`): resolve again; the packet is untouched.
    case stale
}
