import Synchronization
import XFRMPacket

/// What the key manager and monitors hear about (≈ km_* notifications on the XFRM netlink groups).
public enum XfrmEvent: Sendable {
    case stateAdded(SecurityAssociation, update: Bool)
    case stateDeleted(SecurityAssociation)
    case statesFlushed(proto: UInt8)
    /// Soft (hard == false) or hard lifetime expiry (≈ XFRM_MSG_EXPIRE).
    case expire(SecurityAssociation, hard: Bool)
    /// An output packet needs an SA that does not exist (≈ XFRM_MSG_ACQUIRE); `state` is the larval entry.
    case acquire(state: SecurityAssociation, template: Template, policy: Policy)
    case policyAdded(Policy, update: Bool)
    case policyDeleted(Policy)
    case policiesFlushed
    case policyExpire(Policy, hard: Bool)
    /// A NAT-T SA's ESP arrived, authenticated, from another address or UDP source port than the SA's peer
    /// (≈ km_new_mapping, XFRM_MSG_MAPPING): a NAT between the peers moved the mapping, and the key manager may move
    /// the SAs. Sent for every such packet, as the kernel does without XFRMA_MTIMER_THRESH; with it
    /// (`SAConfig.mappingMaxAge`), for a new port at once and for the same port at most once per threshold.
    case mapping(SecurityAssociation, newSource: IPAddress, newPort: UInt16, oldPort: UInt16)
    /// A device went down or away and took these offloaded SAs and policies with it (swift-xfrm's own event; the
    /// kernel tells no one).
    case deviceFlushed(ifindex: Int32, states: [SecurityAssociation], policies: [Policy])
}

/// Fans events out to any number of subscribers through bounded queues: publishing never blocks, and a full
/// queue drops the event and counts it for that subscriber (a slow subscriber never stalls the data path).
public final class EventBus: @unchecked Sendable {
    /// One subscriber's queue.
    public final class Subscription: @unchecked Sendable {
        fileprivate let queue: XFRMMutex<[XfrmEvent]>
        fileprivate let capacity: Int
        private let droppedCount = Atomic<UInt64>(0)
        private let reportedDrops = Atomic<UInt64>(0)
        /// Whether this subscriber answers ACQUIREs (≈ a socket in XFRMNLGRP_ACQUIRE, as a key manager is).
        public let listensForAcquire: Atomic<Bool>
        fileprivate init(capacity: Int, acquire: Bool) {
            self.capacity = capacity
            self.queue = XFRMMutex([])
            self.listensForAcquire = Atomic(acquire)
        }
        /// Events lost because the queue was full.
        public var dropped: UInt64 { self.droppedCount.load(ordering: .relaxed) }

        /// Takes every queued event and says how many were lost since the last call (≈ the ENOBUFS a netlink
        /// listener reads when its socket overran: the key manager must then resynchronise with a dump).
        public func drainReportingLoss() -> (events: [XfrmEvent], lost: UInt64) {
            let events = self.drain()
            let total = self.droppedCount.load(ordering: .relaxed)
            let before = self.reportedDrops.exchange(total, ordering: .relaxed)
            return (events, total &- before)
        }
        fileprivate func offer(_ e: XfrmEvent) {
            let ok = self.queue.withLock { q -> Bool in
                guard q.count < self.capacity else { return false }
                q.append(e)
                return true
            }
            if !ok { self.droppedCount.wrappingAdd(1, ordering: .relaxed) }
        }
        /// Takes every queued event, oldest first.
        public func drain() -> [XfrmEvent] {
            self.queue.withLock { q in
                let out = q
                q.removeAll(keepingCapacity: true)
                return out
            }
        }
    }

    private let subscribers = XFRMMutex<[Subscription]>([])

    public init() {}

    /// A new subscriber whose queue holds at most `capacity` undrained events.
    public func subscribe(capacity: Int = 4096, acquire: Bool = true) -> Subscription {
        let s = Subscription(capacity: capacity, acquire: acquire)
        self.subscribers.withLock { $0.append(s) }
        return s
    }

    public func unsubscribe(_ s: Subscription) {
        self.subscribers.withLock { $0.removeAll { $0 === s } }
    }

    /// True when some subscriber answers ACQUIREs (otherwise an acquire leaves no larval SA, as km_query fails).
    public var hasAcquireListeners: Bool {
        self.subscribers.withLock { $0.contains { $0.listensForAcquire.load(ordering: .relaxed) } }
    }

    public func publish(_ e: XfrmEvent) {
        let subs = self.subscribers.withLock { $0 }
        for s in subs { s.offer(e) }
    }
}
