// XFRMEngine: the packet engine that the simulated hosts and the daemon share.
//
// Pipeline (a host with N workers; wireguard-go's device/ pipeline, with SAs in the place of peers):
//
//   sources ──read(into: batch)──▶ intake ──by affinity──▶ worker rings ──▶ workers ──▶ dispatcher ──▶ sinks
//   (TUN, sockets,   [sequential: one      (bounded; full  (one thread     [per worker:   (wire sockets,
//    NIC host side)   thread per intake;    ring = counted  each; parallel  stack.process  NIC TX queues,
//                     keeps arrival order]  drop)           across workers) then routing]  TUN, captures)
//
// Sequential: each source is read by one intake thread; each worker ring is FIFO; each worker handles its packets
// one batch at a time, in order. Parallel: the workers, each with its own batch, dispatcher and sink buffers; they
// share the stack (its tables are locked per object) and the descriptors (send/write are atomic per datagram).
// Ordering: the intake sends every packet of one SA (`XFRMStack.affinity`: the SPI on input, the OUT policy's
// first template on output) to the same worker, so an SA's sequence numbers leave in the order they were taken
// and its replay window sees them in order; packets of different SAs may overtake each other, as on any
// multi-queue NIC.
// Backpressure: buffers come from one bounded `PacketPool`; a full ring drops the packet and counts it
// (`EngineCounters.ringFull`); no queue grows without bound.

import XFRMCore

/// Engine-wide constants (in one place, as wireguard-go keeps its constants.go).
public enum EngineConstants {
    /// Packets read or written per system call at most, and per worker batch.
    public static let batchSize = PacketBatch.defaultCapacity
    /// Packets a worker's ring holds before the intake drops (counted).
    public static let ringCapacity = 1024
    /// ICMP unreachable errors a dispatcher sends for unprotected output, per second and in a burst (the kernel's
    /// net.ipv4.icmp_msgs_per_sec and icmp_msgs_burst defaults).
    public static let icmpErrorsPerSecond = 1000
    public static let icmpErrorBurst = 50
}
