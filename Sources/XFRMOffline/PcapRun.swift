import XFRMCore
import XFRMPacket

/// Which path `xfrm pcap` runs packets through.
public enum PcapPath: Sendable {
    case output
    /// The input path, arriving on the named interface (nil: the first one that is not loopback).
    case input(device: String?)
}

extension OfflineSession {
    /// `xfrm pcap`: every packet of `inPath` through one path of this session's stack; packets that leave (or are
    /// delivered) go to `outPath`, raw IP. Returns the text printed meanwhile (monitor lines).
    public func runPcap(path: PcapPath, inPath: String, outPath: String) throws(SessionError) -> String {
        let packets: [[UInt8]]
        do throws(PcapError) { packets = try readPcapIPPackets(path: inPath) } catch {
            throw SessionError(error.description)
        }
        var ifindex: Int32 = 0
        if case .input(let device) = path {
            if let device {
                guard let i = self.stack.network.interface(named: device) else {
                    throw SessionError("Cannot find device \"\(device)\"")
                }
                ifindex = i.index
            } else {
                ifindex = self.stack.network.interfaces.first { $0.kind != "loopback" }?.index ?? 1
            }
        }
        let pool = PacketPool(count: 2, slotSize: 65_536 + 1024, headroom: 512)
        var written: [[UInt8]] = []
        var out = ""
        for bytes in packets {
            var buf = pool.allocate()!
            defer { pool.release(buf) }
            guard buf.append(contentsOf: bytes) else { continue }
            switch path {
            case .output:
                switch self.stack.output(&buf) {
                case .transmit, .icmpError: written.append(buf.bytes)
                case .dropped: break
                }
            case .input:
                switch self.stack.input(&buf, ifindex: ifindex) {
                case .deliver: written.append(buf.bytes)
                case .forward:
                    switch self.stack.output(&buf, forwarded: true) {
                    case .transmit, .icmpError: written.append(buf.bytes)
                    case .dropped: break
                    }
                case .ike, .dropped: break
                }
            }
            out += self.drainEvents()
        }
        do throws(PcapError) { try writePcapIPPackets(written, path: outPath) } catch {
            throw SessionError(error.description)
        }
        return out
    }
}
