import XFRMCrypto
import XFRMESP
import XFRMPacket

/// What an SA keeps of the configuration it was made from: everything but the values its state holds from then on
/// (the lifetime limits, NAT-T ports and output mark, which an update may change, and the starting sequence numbers
/// and replay bitmap, which the ESP transform holds). Read those through the SA (`lifetime`, `encapsulation`,
/// `outputMark`, `transform`), or all of it at once with `currentConfig`.
///
/// The fields are in an order that leaves few holes (Swift lays a struct out in declaration order): with 100,000
/// SAs every byte counts 100 KB.
public struct SAParameters: Sendable {
    public var id: SAID
    /// SA flags (XFRM_STATE_*): see `SAConfig.icmpFlag`, `SAConfig.wildRecvFlag`.
    public var flags: UInt8
    public var mode: ESPMode
    public var direction: SADirection?
    public var reqid: UInt32
    public var source: IPAddress
    public var esn: Bool
    /// Whether the replay state travels in XFRMA_REPLAY_ESN_VAL (the legacy window field is then 0, as the kernel
    /// lists it) rather than XFRMA_REPLAY_VAL; nil: ESN or a window above 32 decide, as iproute2 does.
    public var replayESNFormat: Bool?
    public var encapsulationType: UInt16
    public var ifID: UInt32
    public var selector: Selector
    public var tfcPad: UInt32
    public var mark: Mark
    public var replayWindow: Int
    public var extraFlags: UInt32
    /// The key manager's sequence number (xfrm_usersa_info.seq), matching an ACQUIRE.
    public var kmSequence: UInt32
    /// The NAT-T original address (xfrm_encap_tmpl.encap_oa), kept for listings.
    public var encapsulationOriginalAddress: IPAddress?
    /// The CPU this SA serves (XFRMA_SA_PCPU, `pcpu-num`; RFC 9611 per-CPU SAs); nil: any CPU (the kernel's
    /// UINT_MAX). Output resolution on another CPU skips it (≈ xfrm_state_look_at); the stack's "CPU" is the
    /// engine worker that runs the output path.
    public var pcpuNum: UInt32?
    /// XFRMA_MTIMER_THRESH: a NAT-T input SA tells the key manager of a peer's move to a new port at once, and of
    /// more moves to that same port at most once per this many seconds (≈ km_new_mapping's rate limit); 0: every
    /// packet from a moved peer is told.
    public var mappingMaxAge: UInt32 = 0
    /// The algorithms and keys (nil: a larval SA). Listings read names and keys from here too, so each key is held
    /// once and wiped with the SA.
    public var crypto: ESPCryptoSpec?

    /// True when the replay state is listed through XFRMA_REPLAY_ESN_VAL.
    public var usesReplayESN: Bool { self.replayESNFormat ?? (self.esn || self.replayWindow > 32) }
}

/// Everything needed to create an SA (≈ the parts of xfrm_usersa_info and its attributes the core uses): the
/// parameters the SA keeps, and the values its state starts from.
public struct SAConfig: Sendable {
    public var parameters: SAParameters
    public var lifetime: LifetimeConfig
    public var outboundSequence: UInt64
    public var inboundSequence: UInt64
    /// The received-packet bitmap below `inboundSequence` (XFRMA_REPLAY_VAL / XFRMA_REPLAY_ESN_VAL), restored.
    public var replayBitmap: ReplayBitmap?
    public var encapsulation: NATTEncapsulation?
    /// The mark set on packets the SA produces (XFRMA_SET_MARK / XFRMA_SET_MARK_MASK, `output-mark`), kept and
    /// listed; the simulated network does not route by mark.
    public var outputMark: Mark?

    /// XFRM_STATE_ICMP in `flags`: the SA also carries ICMP errors about the traffic its selector covers.
    public static let icmpFlag: UInt8 = 16
    /// XFRM_STATE_WILDRECV in `flags`: the SA accepts input from any source and is never chosen for output.
    public static let wildRecvFlag: UInt8 = 8

    public init(id: SAID, source: IPAddress, selector: Selector, reqid: UInt32 = 0, mode: ESPMode = .transport,
                replayWindow: Int = 0, flags: UInt8 = 0, extraFlags: UInt32 = 0, mark: Mark = Mark(), ifID: UInt32 = 0,
                direction: SADirection? = nil, lifetime: LifetimeConfig = LifetimeConfig(),
                encapsulation: NATTEncapsulation? = nil, encapsulationOriginalAddress: IPAddress? = nil,
                encapsulationType: UInt16 = 2, esn: Bool = false, crypto: ESPCryptoSpec?,
                outboundSequence: UInt64 = 0, inboundSequence: UInt64 = 0,
                tfcPad: UInt32 = 0, kmSequence: UInt32 = 0, replayBitmap: ReplayBitmap? = nil) {
        self.parameters = SAParameters(
            id: id, flags: flags, mode: mode, direction: direction, reqid: reqid, source: source, esn: esn,
            replayESNFormat: nil, encapsulationType: encapsulationType, ifID: ifID, selector: selector, tfcPad: tfcPad,
            mark: mark, replayWindow: replayWindow, extraFlags: extraFlags, kmSequence: kmSequence,
            encapsulationOriginalAddress: encapsulationOriginalAddress, pcpuNum: nil, crypto: crypto)
        self.lifetime = lifetime
        self.outboundSequence = outboundSequence
        self.inboundSequence = inboundSequence
        self.replayBitmap = replayBitmap
        self.encapsulation = encapsulation
        self.outputMark = nil
    }

    /// A configuration from kept parameters and the state values to start from.
    public init(_ parameters: SAParameters, lifetime: LifetimeConfig, encapsulation: NATTEncapsulation?,
                outputMark: Mark?, outboundSequence: UInt64, inboundSequence: UInt64, replayBitmap: ReplayBitmap?) {
        self.parameters = parameters
        self.lifetime = lifetime
        self.encapsulation = encapsulation
        self.outputMark = outputMark
        self.outboundSequence = outboundSequence
        self.inboundSequence = inboundSequence
        self.replayBitmap = replayBitmap
    }

    // The parameters by name (see `SAParameters` for what each means).
    public var id: SAID { get { self.parameters.id } set { self.parameters.id = newValue } }
    public var source: IPAddress { get { self.parameters.source } set { self.parameters.source = newValue } }
    public var selector: Selector { get { self.parameters.selector } set { self.parameters.selector = newValue } }
    public var reqid: UInt32 { get { self.parameters.reqid } set { self.parameters.reqid = newValue } }
    public var mode: ESPMode { get { self.parameters.mode } set { self.parameters.mode = newValue } }
    public var replayWindow: Int {
        get { self.parameters.replayWindow } set { self.parameters.replayWindow = newValue }
    }
    public var flags: UInt8 { get { self.parameters.flags } set { self.parameters.flags = newValue } }
    public var extraFlags: UInt32 { get { self.parameters.extraFlags } set { self.parameters.extraFlags = newValue } }
    public var mark: Mark { get { self.parameters.mark } set { self.parameters.mark = newValue } }
    public var ifID: UInt32 { get { self.parameters.ifID } set { self.parameters.ifID = newValue } }
    public var direction: SADirection? {
        get { self.parameters.direction } set { self.parameters.direction = newValue }
    }
    public var encapsulationOriginalAddress: IPAddress? {
        get { self.parameters.encapsulationOriginalAddress }
        set { self.parameters.encapsulationOriginalAddress = newValue }
    }
    public var encapsulationType: UInt16 {
        get { self.parameters.encapsulationType } set { self.parameters.encapsulationType = newValue }
    }
    public var esn: Bool { get { self.parameters.esn } set { self.parameters.esn = newValue } }
    public var crypto: ESPCryptoSpec? { get { self.parameters.crypto } set { self.parameters.crypto = newValue } }
    public var tfcPad: UInt32 { get { self.parameters.tfcPad } set { self.parameters.tfcPad = newValue } }
    public var kmSequence: UInt32 { get { self.parameters.kmSequence } set { self.parameters.kmSequence = newValue } }
    public var replayESNFormat: Bool? {
        get { self.parameters.replayESNFormat } set { self.parameters.replayESNFormat = newValue }
    }
    public var pcpuNum: UInt32? { get { self.parameters.pcpuNum } set { self.parameters.pcpuNum = newValue } }
    public var mappingMaxAge: UInt32 {
        get { self.parameters.mappingMaxAge } set { self.parameters.mappingMaxAge = newValue }
    }
    public var usesReplayESN: Bool { self.parameters.usesReplayESN }
}
