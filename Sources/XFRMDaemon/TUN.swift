#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import XFRMCore
import XFRMEngine
import XFRMPacket

/// The inner side's reads: whole IP packets from the TUN device (non-blocking, one per read(2): a TUN without
/// IFF_VNET_HDR has no batched read), as packets for the output path.
final class TUNSource: PacketSource {
    let fd: Int32
    let pool: PacketPool
    let counters: DatapathCounters
    let engine: EngineCounters

    init(fd: Int32, pool: PacketPool, counters: DatapathCounters, engine: EngineCounters) {
        self.fd = fd
        self.pool = pool
        self.counters = counters
        self.engine = engine
    }

    func read(into batch: inout PacketBatch) -> Int {
        var added = 0
        while !batch.isFull {
            guard var buf = self.pool.allocate() else {
                self.engine.poolExhausted.wrappingAdd(1, ordering: .relaxed)
                self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
                break
            }
            let room = 2048
            let p = buf.append(room)
            let n = Glibc.read(self.fd, p, room)
            guard n > 0 else {
                self.pool.release(buf)
                break
            }
            buf.trimBack(room - n)
            batch.append(PacketBatch.Packet(buf, stage: .output))
            added += 1
        }
        self.counters.tunRead.wrappingAdd(UInt64(added), ordering: .relaxed)
        return added
    }
}

/// The inner side's writes: what the input path delivered (and ICMP errors for local senders) into the TUN.
/// Shared by the workers: write(2) on a TUN is atomic per packet.
final class TUNSink: PacketSink, @unchecked Sendable {
    let fd: Int32
    let pool: PacketPool
    let counters: DatapathCounters

    init(fd: Int32, pool: PacketPool, counters: DatapathCounters) {
        self.fd = fd
        self.pool = pool
        self.counters = counters
    }

    func write(_ batch: inout PacketBatch) {
        var written: UInt64 = 0
        for i in 0..<batch.count {
            let b = batch[i].buffer
            if Glibc.write(self.fd, b.data, b.count) == b.count {
                written += 1
            } else {
                self.counters.sendErrors.wrappingAdd(1, ordering: .relaxed)
            }
            self.pool.release(b)
        }
        self.counters.tunWritten.wrappingAdd(written, ordering: .relaxed)
        batch.removeAll()
    }
}
