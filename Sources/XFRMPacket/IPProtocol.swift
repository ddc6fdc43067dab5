/// IANA protocol numbers used by the stack (Specification constants).
public enum IPProtocolNumber {
    public static let hopByHop: UInt8 = 0
    public static let icmp: UInt8 = 1
    public static let ipv4: UInt8 = 4  // IP-in-IP: tunnel-mode inner IPv4
    public static let tcp: UInt8 = 6
    public static let udp: UInt8 = 17
    public static let ipv6: UInt8 = 41  // tunnel-mode inner IPv6
    public static let routing: UInt8 = 43
    public static let fragment: UInt8 = 44
    public static let esp: UInt8 = 50
    public static let ah: UInt8 = 51
    public static let icmpv6: UInt8 = 58
    public static let noNextHeader: UInt8 = 59  // RFC 4303 §2.6: TFC dummy packet
    public static let destinationOptions: UInt8 = 60
    public static let mobility: UInt8 = 135
}

/// Header sizes (Specification constants).
public enum HeaderSize {
    public static let ipv4Minimum = 20
    public static let ipv4Maximum = 60
    public static let ipv6 = 40
    public static let udp = 8
}
