import XFRMCore
import XFRMEngine

/// The device's TX queue as an engine sink (≈ ndo_start_xmit over a batch): plaintext with packet-offload
/// metadata, ESP to seal with crypto-offload metadata, or plain frames (no metadata).
extension SimulatedNIC: PacketSink {
    public func write(_ batch: inout PacketBatch) {
        for i in 0..<batch.count { self.transmit(batch[i].buffer, metadata: batch[i].metadata ?? OffloadMetadata()) }
        batch.removeAll()
    }
}
