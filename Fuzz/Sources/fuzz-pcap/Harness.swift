// The pcap reader (XFRMPacket.parsePcapIPPackets, behind `xfrm pcap` and esp-tool): any bytes give IP packets or
// a PcapError, never a crash; and what it read, written again as a pcap file (LINKTYPE_RAW), reads back the same.
import XFRMPacket

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPcap(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: data == nil ? 0 : size))
    guard let packets = try? parsePcapIPPackets(bytes, name: "input") else { return 0 }
    guard let again = try? parsePcapIPPackets(pcapFileBytes(packets), name: "written"), again == packets else {
        fatalError("pcap: \(packets.count) packets read do not survive a write and a read")
    }
    return 0
}
