// xfrmd's packet intake (XFRMDaemon.DaemonIntake: the daemon's own TUN source, datagram framing, UDP_GRO cutting,
// dispatcher rules, TUN sink), on the ESP fixture's stack (FuzzSupport.ESPFixture), whose eth0 is the wire.
//
// Input: byte 0 chooses what arrives, mod 6:
//   0    a TUN read: the rest is a virtio-net header (flags, GSO type, header length, GSO size, checksum start and
//        offset: TSO4/6 and USO superpackets, partial checksums) and the packet;
//   1–4  a datagram on the UDP 4500 IPv4, raw ESP IPv4, UDP 4500 IPv6 or raw ESP IPv6 socket (the rest as the
//        kernel hands it over: the UDP payload — IKE behind the non-ESP marker, a keepalive, ESP — the raw IPv4
//        packet, the IPv6 payload); byte 1 bit 0 makes it a UDP_GRO read whose segment size is bytes 2–3;
//   5    an ESP packet sealed for one of the fixture's SAs (byte 1 the SA, bytes 2–5 the sequence number, the rest
//        the plaintext with its trailer) arriving on the socket that SA's packets use, so that what it carries
//        reaches the TUN sink.
// Afterwards every packet buffer must be back in the pool: nothing the intake took may be lost or kept.
#if canImport(Glibc)
import Glibc
#endif
import FuzzSupport
import XFRMCore
import XFRMDaemon
import XFRMEngine
import XFRMPacket

/// The wire: takes what the stack sends out of eth0 and returns the buffers.
final class WireDrain: PacketSink {
    let pool: PacketPool
    init(pool: PacketPool) { self.pool = pool }
    func write(_ batch: inout PacketBatch) {
        for i in 0..<batch.count { self.pool.release(batch[i].buffer) }
        batch.removeAll()
    }
}

nonisolated(unsafe) let fixture = ESPFixture.shared
nonisolated(unsafe) let pool = PacketPool(count: 256, slotSize: 4096, headroom: 256)
nonisolated(unsafe) let intake = DaemonIntake(
    stack: fixture.stack, wanIfindex: fixture.ifindex, wire: WireDrain(pool: pool),
    tunFD: open("/dev/null", O_WRONLY), pool: pool)
let peer4 = IPAddress("192.0.2.1")!, local4 = IPAddress("192.0.2.2")!
let peer6 = IPAddress("2001:db8:1::1")!, local6 = IPAddress("2001:db8:2::2")!

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzDaemonIntake(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    var r = ByteReader(UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    let kind = Int(r.byte()) % 6
    switch kind {
    case 0:
        intake.tunRead(r.rest)
    case 1...4:
        let socket = DaemonIntake.Socket.allCases[kind - 1]
        let flags = r.byte()
        let gro = flags & 1 != 0 ? Int(r.u16()) : nil
        let v4 = socket == .udp4 || socket == .raw4
        intake.datagram(r.rest, socket: socket, source: v4 ? peer4 : peer6, sourcePort: 4500,
                        destination: v4 ? local4 : local6, groSize: gro)
    default:
        let sa = fixture.sas[Int(r.byte()) % fixture.sas.count]
        let sequence = UInt64(r.u32())
        sa.transform?.setInboundSequence(0)
        let packet = fixture.seal(sa, sequence: sequence, plaintext: Array(r.rest), tos: 0)
        let v4 = sa.id.destination.version == 4
        let udp = sa.encapsulation != nil
        let socket: DaemonIntake.Socket = v4 ? (udp ? .udp4 : .raw4) : (udp ? .udp6 : .raw6)
        // What each socket hands over: raw IPv4 the whole packet, raw IPv6 its payload, UDP the UDP payload.
        let skip = (v4 ? (udp ? 28 : 0) : (udp ? 48 : 40))
        packet.withUnsafeBytes { b in
            intake.datagram(UnsafeRawBufferPointer(rebasing: b[skip...]), socket: socket, source: v4 ? peer4 : peer6,
                            sourcePort: 4500, destination: v4 ? local4 : local6)
        }
    }
    if pool.available != pool.slotCount {
        fatalError("daemon intake: \(pool.slotCount - pool.available) packet buffers not returned to the pool")
    }
    return 0
}
