import XFRMCore
import XFRMPacket
import XFRMWire

/// What an SA dump (GETSA with NLM_F_DUMP) may be limited to (≈ xfrm_dump_sa's xfrm_state_walk_init): a protocol
/// (XFRMA_PROTO) and source and destination prefixes of one family (XFRMA_ADDRESS_FILTER, struct
/// xfrm_address_filter), which iproute2's `ip xfrm state list` sends on every dump.
struct SADumpFilter {
    /// 0: every protocol; IPSEC_PROTO_ANY (`XfrmProto.any`): AH, ESP and IPComp (≈ xfrm_id_proto_match).
    var proto: UInt8 = 0
    var source = XfrmAddress()
    var destination = XfrmAddress()
    /// AF_INET or AF_INET6 limits the dump to SAs of that family; any other value does not.
    var family: UInt16 = 0
    var sourcePrefix: UInt8 = 0
    var destinationPrefix: UInt8 = 0

    /// sizeof(struct xfrm_address_filter): two xfrm_address_t, a u16 family, two u8 prefix lengths.
    static let wireSize = 36

    /// The filter a dump request carries; EINVAL for a prefix longer than an xfrm_address_t (as xfrm_dump_sa checks
    /// since the fix for its out-of-bounds read) and ERANGE for an attribute shorter than its struct (the
    /// attribute policy's minimum length).
    init(_ attributes: [XfrmAttribute]) throws(ControlError) {
        for a in attributes {
            switch a {
            case .proto(let p):
                self.proto = p
            case .unknown(let t, let p) where t == XfrmAttributeType.addressFilter.rawValue:
                guard p.count >= Self.wireSize else {
                    throw ControlError(Errno.ERANGE, "Attribute failed policy validation")
                }
                self.source = XfrmAddress(bytes: Array(p[0..<16]))
                self.destination = XfrmAddress(bytes: Array(p[16..<32]))
                self.family = UInt16(p[32]) | UInt16(p[33]) << 8
                self.sourcePrefix = p[34]
                self.destinationPrefix = p[35]
                guard self.sourcePrefix <= 128, self.destinationPrefix <= 128 else { throw .invalid("") }
            default:
                continue
            }
        }
    }

    /// ≈ xfrm_id_proto_match and __xfrm_state_filter_match.
    func matches(_ sa: SecurityAssociation) -> Bool {
        let p = sa.id.proto
        guard self.proto == 0 || p == self.proto
            || (self.proto == XfrmProto.any && [XfrmProto.ah, XfrmProto.esp, XfrmProto.comp].contains(p))
        else { return false }
        let family = sa.id.destination.version == 4 ? AddressFamily.inet : AddressFamily.inet6
        if (self.family == AddressFamily.inet || self.family == AddressFamily.inet6) && family != self.family {
            return false
        }
        return Self.prefixMatches(XfrmAddress(sa.config.source), self.source, bits: Int(self.sourcePrefix))
            && Self.prefixMatches(XfrmAddress(sa.id.destination), self.destination, bits: Int(self.destinationPrefix))
    }

    /// ≈ addr_match: the first `bits` bits of the two xfrm_address_t, most significant first.
    static func prefixMatches(_ a: XfrmAddress, _ b: XfrmAddress, bits: Int) -> Bool {
        let whole = bits / 8
        guard a.bytes[0..<whole] == b.bytes[0..<whole] else { return false }
        let rest = bits % 8
        guard rest != 0 else { return true }
        let mask = UInt8(truncatingIfNeeded: 0xff << (8 - rest))
        return a.bytes[whole] & mask == b.bytes[whole] & mask
    }
}
