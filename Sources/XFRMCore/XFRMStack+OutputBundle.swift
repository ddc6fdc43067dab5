import XFRMESP
import XFRMPacket

// The output fast path of a protected flow (≈ a socket's cached dst whose xfrm bundle is still valid): no route,
// policy or SAD lookup; one acquisition of the SA's lock for its state, lifetime, ESP and accounting.

extension XFRMStack {
    /// Sends `packet` through a cached one-SA bundle; nil when the SA is no longer valid (the caller resolves again
    /// and the packet is untouched).
    @inline(__always)
    func outputCachedBundle(_ packet: inout PacketBuffer, _ b: OutputBundle, now: UInt64,
                            transformed: inout Bool) -> OutputResult? {
        // A packet the device cannot take (IP options or extension headers, too big once inside ESP) is sealed in
        // software, as the per-packet path does.
        if let (dev, o) = b.device, let transform = b.sa.transform,
            Self.cryptoOffloadTakes(packet, transform: transform, mtu: b.mtu, tunnel: b.sa.config.mode == .tunnel),
            !dev.callbacks.contains(.offloadOK) || dev.offloadOK(packet, sa: b.sa, offload: o)
        {
            var layout = ESPLayout()
            switch self.apply(b.sa, to: &packet, now: now, deviceLayout: &layout, limit: b.limit, retryIfInvalid: true) {
            case .stale: return nil
            case .done(let r): return r
            case .next: break
            }
            // ≈ xfrm_replay_overflow_offload_esn: the high half moved on, so the device must learn it.
            if b.sa.config.esn && layout.sequence & 0xffff_ffff == 0 { dev.advanceESN(b.sa, offload: o) }
            let r = self.transmit(&packet, ifindex: b.ifindex, mtu: b.mtu, transformed: true, mayFragment: false)
            guard case .transmit = r else { return r }
            transformed = true  // ESP-framed for the device, which seals it
            var meta = OffloadMetadata()
            meta.espOffset = layout.espOffset
            meta.cryptLength = layout.cryptLength
            meta.esnHigh = layout.esnHigh
            meta.handle = o.handle
            return .offload(ifindex: o.ifindex, metadata: meta)
        }
        var unused = ESPLayout()
        switch self.apply(b.sa, to: &packet, now: now, deviceLayout: &unused, seal: true, limit: b.limit,
                          retryIfInvalid: true) {
        case .stale: return nil
        case .done(let r): return r
        case .next: break
        }
        transformed = true
        return self.transmit(&packet, ifindex: b.ifindex, mtu: b.mtu, transformed: true, mayFragment: true)
    }

    /// Remembers a flow's one-SA bundle after its first packet went out through it.
    func cacheBundle(_ sa: SecurityAssociation, device: (any XfrmOffloadDevice, StateOffload)?, flow: Flow, key: Flow,
                     tag: UInt, policy: Policy, generation: UInt64, now: UInt64) {
        let tunnel = sa.config.mode == .tunnel
        guard let route = self.network.egress(to: tunnel ? sa.id.destination : flow.destination),
            let transform = sa.transform
        else { return }
        if let (_, o) = device, route.ifindex != o.ifindex { return }
        let bundle = OutputBundle(
            sa: sa, ifindex: route.ifindex, mtu: route.mtu,
            limit: tunnel ? transform.maximumPayload(forMTU: route.mtu)
                : Self.transportLimit(version: flow.version, transform: transform, mtu: route.mtu), device: device)
        self.outputCache.store(
            OutputCache.Entry(flow: key, tag: tag, generation: generation, value: .bundle(policyIndex: policy.index, bundle)),
            now: now)
    }
}
