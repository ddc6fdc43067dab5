import XFRMCrypto
import XFRMPacket

/// Encapsulation mode (≈ XFRM_MODE_TRANSPORT / XFRM_MODE_TUNNEL).
public enum ESPMode: String, Sendable {
    /// ESP between the original IP header and its payload (RFC 4303 §3.1.1).
    case transport
    /// The whole packet inside ESP behind a new outer IP header (RFC 4303 §3.1.2).
    case tunnel
}

/// UDP encapsulation of ESP for NAT traversal (RFC 3948; ≈ xfrm_encap_tmpl with ESPINUDP).
public struct NATTEncapsulation: Sendable, Equatable {
    public var sourcePort: UInt16
    public var destinationPort: UInt16
    public init(sourcePort: UInt16 = 4500, destinationPort: UInt16 = 4500) {
        self.sourcePort = sourcePort
        self.destinationPort = destinationPort
    }
}

/// SA flags the ESP data path honours (≈ XFRM_STATE_* and XFRM_SA_XFLAG_*).
public struct ESPFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Do not propagate ECN between inner and outer headers (XFRM_STATE_NOECN).
    public static let noECN = ESPFlags(rawValue: 1 << 0)
    /// On tunnel decapsulation, copy the outer DSCP into the inner header (XFRM_STATE_DECAP_DSCP).
    public static let decapDSCP = ESPFlags(rawValue: 1 << 1)
    /// Clear DF on the outer IPv4 header (XFRM_STATE_NOPMTUDISC).
    public static let noPMTUDiscovery = ESPFlags(rawValue: 1 << 2)
    /// Do not copy the inner DSCP to the outer header (XFRM_SA_XFLAG_DONT_ENCAP_DSCP).
    public static let dontEncapDSCP = ESPFlags(rawValue: 1 << 3)
    /// Let a non-ESN 32-bit outbound sequence number wrap instead of refusing to send
    /// (XFRM_SA_XFLAG_OSEQ_MAY_WRAP; non-AEAD only, because AEAD nonces would repeat).
    public static let outboundSequenceMayWrap = ESPFlags(rawValue: 1 << 4)
}

/// An invalid ESP SA configuration, with a message naming what is wrong.
public struct ESPConfigError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Everything the ESP transform needs to know about one SA (≈ the ESP-relevant part of xfrm_usersa_info).
public struct ESPConfig: Sendable {
    public var spi: UInt32
    public var mode: ESPMode
    public var crypto: ESPCryptoSpec
    /// Outer source and destination in tunnel mode (required there, ignored in transport mode).
    public var tunnelSource: IPAddress?
    public var tunnelDestination: IPAddress?
    /// NAT-T UDP encapsulation, if any.
    public var encapsulation: NATTEncapsulation?
    /// Extended sequence numbers (RFC 4303 §2.2.1).
    public var esn: Bool
    /// Inbound anti-replay window in packets, 0...4096.
    public var replayWindow: Int
    public var flags: ESPFlags
    /// The last outbound sequence number already used (iproute2 `replay-oseq`/`replay-oseq-hi`); the first packet
    /// gets this plus one.
    public var outboundSequence: UInt64
    /// The highest inbound sequence number already received (iproute2 `replay-seq`/`replay-seq-hi`).
    public var inboundSequence: UInt64
    /// Which numbers at or below `inboundSequence` were already received (restored state); nil: none.
    public var inboundBitmap: ReplayBitmap?
    /// Outer IPv4 TTL / IPv6 hop limit in tunnel mode.
    public var outerHopLimit: UInt8

    public init(
        spi: UInt32, mode: ESPMode, crypto: ESPCryptoSpec, tunnelSource: IPAddress? = nil,
        tunnelDestination: IPAddress? = nil, encapsulation: NATTEncapsulation? = nil, esn: Bool = false,
        replayWindow: Int = 32, flags: ESPFlags = [], outboundSequence: UInt64 = 0, inboundSequence: UInt64 = 0,
        outerHopLimit: UInt8 = 64, inboundBitmap: ReplayBitmap? = nil
    ) {
        self.inboundBitmap = inboundBitmap
        self.spi = spi
        self.mode = mode
        self.crypto = crypto
        self.tunnelSource = tunnelSource
        self.tunnelDestination = tunnelDestination
        self.encapsulation = encapsulation
        self.esn = esn
        self.replayWindow = replayWindow
        self.flags = flags
        self.outboundSequence = outboundSequence
        self.inboundSequence = inboundSequence
        self.outerHopLimit = outerHopLimit
    }

    /// Checks the combination, as the kernel's verify_newsa_info and esp_init_state do.
    public func validate() throws(ESPConfigError) {
        if self.replayWindow < 0 || self.replayWindow > ReplayWindow.maximumSize {
            throw ESPConfigError("replay-window (\(self.replayWindow)) > XFRMA_REPLAY_ESN_MAX (4096).")
        }
        if self.mode == .tunnel {
            guard let s = self.tunnelSource, let d = self.tunnelDestination else {
                throw ESPConfigError("tunnel mode needs outer source and destination addresses")
            }
            if s.version != d.version {
                throw ESPConfigError("tunnel source \(s) and destination \(d) are of different address families")
            }
        }
        if self.flags.contains(.outboundSequenceMayWrap) {
            if self.crypto.isAEAD {
                throw ESPConfigError(
                    "oseq-may-wrap is refused with an AEAD: the nonce is the sequence number and would repeat")
            }
            if self.esn {
                throw ESPConfigError("oseq-may-wrap applies only without ESN")
            }
        }
        if !self.esn && (self.outboundSequence > UInt64(UInt32.max) || self.inboundSequence > UInt64(UInt32.max)) {
            throw ESPConfigError("replay-seq-hi and replay-oseq-hi need the esn flag")
        }
    }
}
