import XFRMCore
import XFRMPacket
import XFRMSimHost

/// Which path `xfrm pcap` runs packets through.
public enum PcapPath: Sendable {
    case output
    /// The input path, arriving on the named interface (nil: the first one that is not loopback).
    case input(device: String?)
}

extension OfflineSession {
    /// `xfrm pcap`: every packet of `inPath` through one path of this session's host; every packet that leaves an
    /// interface (including what a simulated NIC's engine puts on its wire) or is delivered locally goes to
    /// `outPath`, raw IP, in order. Each packet is run to completion (engines drained) before the next.
    /// Returns the text printed meanwhile (monitor lines).
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
        _ = self.host.takeCaptured()
        var written: [[UInt8]] = []
        var out = ""
        for bytes in packets {
            switch path {
            case .output:
                self.host.send(bytes)
            case .input:
                if let nic = self.host.nic(ifindex: ifindex) {
                    nic.receiveFromWire(bytes)
                } else {
                    self.host.receive(bytes, ifindex: ifindex)
                }
            }
            self.host.settle()
            written += self.host.takeCaptured()
            out += self.drainEvents()
        }
        _ = self.host.takeDelivered()
        do throws(PcapError) { try writePcapIPPackets(written, path: outPath) } catch {
            throw SessionError(error.description)
        }
        return out
    }
}
