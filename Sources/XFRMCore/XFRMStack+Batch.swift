import XFRMPacket

// The stack's batch entry points: one call per batch from the engine's workers; per packet the same work as
// `output`/`input`, nothing allocated.

extension XFRMStack {
    /// Runs every pending packet of the batch through the path its stage names and stores the verdict; the buffers
    /// stay in the batch for the dispatcher. `cpu`: the worker running the batch (picks among per-CPU SAs).
    /// Consecutive packets of one flow share the work of finding their bundle (the memo of the previous packet) and,
    /// one acquisition of the SA's lock (`outputRun`, `inputRun`). `ifID`: the output and forwarded packets were
    /// routed into the XFRM interface with this id (0: ordinary traffic), so only policies with that if_id match them
    /// (≈ xfrmi_xmit's xfrm_lookup_with_ifid).
    public func process(_ batch: inout PacketBatch, cpu: UInt32 = 0, ifID: UInt32 = 0) {
        var outputMemo = OutputMemo()
        var inputMemo = InputMemo()
        // One clock read per batch: lifetimes and use times have one-second resolution, a batch takes microseconds.
        let now = self.clock.now
        var i = 0
        while i < batch.count {
            defer { i += 1 }
            guard case .pending = batch[i].verdict else { continue }
            switch batch[i].stage {
            case .output, .forward:
                var transformed = false
                let forwarded = batch[i].stage == .forward
                let r = self.output(&batch[i].buffer, mark: 0, ifID: ifID, forwarded: forwarded, cpu: cpu,
                                    now: now, transformed: &transformed, memo: &outputMemo)
                batch[i].verdict = .output(r, transformed: transformed)
                // The packets after it that the memo's bundle serves: one lock for all of them.
                if transformed {
                    i = self.outputRun(&batch, from: i + 1, memo: outputMemo, cpu: cpu, forwarded: forwarded,
                                       ifID: ifID, now: now) - 1
                }
            case .input:
                var decapsulated = false
                let ifindex = batch[i].ifindex
                let metadata = batch[i].metadata
                let r = self.input(&batch[i].buffer, ifindex: ifindex, mark: 0, metadata: metadata,
                                   now: now, decapsulated: &decapsulated, memo: &inputMemo)
                batch[i].verdict = .input(r, decapsulated: decapsulated)
                // The packets after it through the same outermost SA: one lock for all of them.
                if decapsulated { i = self.inputRun(&batch, from: i + 1, memo: &inputMemo, now: now) - 1 }
            }
        }
    }

    /// Which stream of work a packet belongs to, so that an engine gives every packet of one SA to the same worker
    /// and its sequence numbers leave (and its replay window advances) in order.
    ///
    /// Received ESP: its SPI (what the SAD lookup keys on; ESP in UDP after its 8-byte header, non-ESP marker and
    /// keepalives 0). Outbound: the destination, protocol and reqid of the first template of the OUT policy the
    /// packet matches (the SA `xfrm_state_find` would pick lives there), or the packet's destination when no policy
    /// matches; when per-CPU SAs serve that template, the flow itself (addresses, protocol, ports), so one tunnel
    /// spreads over the workers. Read-only: no counter, no use time, no acquire.
    public func affinity(of packet: PacketBuffer, stage: PacketBatch.Stage, ifID: UInt32 = 0) -> UInt32 {
        let p = packet.data
        let n = packet.count
        guard n >= 20 else { return 0 }
        if stage == .input {
            var offset: Int
            var proto: UInt8
            switch p.loadByte(at: 0) >> 4 {
            case 4:
                offset = Int(p.loadByte(at: 0) & 0x0f) * 4
                proto = p.loadByte(at: 9)
            case 6:
                guard n >= 40 else { return 0 }
                offset = 40
                proto = p.loadByte(at: 6)
            default:
                return 0
            }
            if proto == 17 {  // ESP in UDP: the SPI after the UDP header (0 for IKE and keepalives)
                offset += 8
            } else if proto != 50 {
                return 0
            }
            guard n >= offset + 4 else { return 0 }
            return p.loadBE32(at: offset)
        }
        guard var flow = Flow.parse(p, count: n, mark: 0) else { return 0 }
        flow.ifID = ifID  // the OUT policy of traffic routed into an XFRM interface has its if_id
        var h = Hasher()
        if let policy = self.policies.lookup(.outbound, flow), let t = policy.templates.first {
            let destination = t.mode == 1 ? (t.destination ?? flow.destination) : flow.destination
            // RFC 9611: a tunnel with per-CPU SAs has one sequence space per CPU, so its flows may spread over the
            // workers (each flow stays on one, so its packets keep their order).
            if self.states.hasPerCPUStates(destination: destination, proto: t.proto, reqid: t.reqid) {
                return Self.flowHash(flow)
            }
            h.combine(destination)
            h.combine(t.proto)
            h.combine(t.reqid)
        } else {
            h.combine(flow.destination)
        }
        return UInt32(truncatingIfNeeded: h.finalize())
    }

    /// A flow's 5-tuple hash (which worker a flow of a per-CPU tunnel runs on).
    static func flowHash(_ flow: Flow) -> UInt32 {
        var h = Hasher()
        h.combine(flow.source)
        h.combine(flow.destination)
        h.combine(flow.proto)
        h.combine(flow.sourcePort)
        h.combine(flow.destinationPort)
        return UInt32(truncatingIfNeeded: h.finalize())
    }
}
