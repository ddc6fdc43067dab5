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
    /// A device went down or away and took these offloaded SAs and policies with it (swift-xfrm's own event; the
    /// kernel tells no one).
    case deviceFlushed(ifindex: Int32, states: [SecurityAssociation], policies: [Policy])
}

/// Fans events out to any number of subscribers through bounded queues: publishing never blocks, and a full
/// queue drops the event and counts it for that subscriber (a slow subscriber never stalls the data path).
public final class EventBus: @unchecked Sendable {
    /// One subscriber's queue.
    public final class Subscription: @unchecked Sendable {
        fileprivate let queue: Mutex<[XfrmEvent]>
        fileprivate let capacity: Int
        private let droppedCount = Atomic<UInt64>(0)
        fileprivate init(capacity: Int) {
            self.capacity = capacity
            self.queue = Mutex([])
        }
        /// Events lost because the queue was full.
        public var dropped: UInt64 { self.droppedCount.load(ordering: .relaxed) }
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

    private let subscribers = Mutex<[Subscription]>([])

    public init() {}

    /// A new subscriber whose queue holds at most `capacity` undrained events.
    public func subscribe(capacity: Int = 4096) -> Subscription {
        let s = Subscription(capacity: capacity)
        self.subscribers.withLock { $0.append(s) }
        return s
    }

    public func unsubscribe(_ s: Subscription) {
        self.subscribers.withLock { $0.removeAll { $0 === s } }
    }

    public func publish(_ e: XfrmEvent) {
        let subs = self.subscribers.withLock { $0 }
        for s in subs { s.offer(e) }
    }
}
