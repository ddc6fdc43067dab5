#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization

/// A bounded FIFO of elements with blocking batch pops (≈ a buffered Go channel): producers push whole batches
/// under one lock acquisition; a full ring refuses what does not fit and counts it; a consumer sleeps until
/// something arrives, a timeout passes or the ring is closed. Built on a pthread mutex and condition variable, so
/// that thread sanitizers see the synchronization.
public final class BoundedRing<Element>: @unchecked Sendable {
    public let capacity: Int
    private let storage: UnsafeMutablePointer<Element>
    private var head = 0
    private var count = 0
    private var closed = false
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let nonEmpty: UnsafeMutablePointer<pthread_cond_t>
    /// Elements refused because the ring was full (or closed).
    public let dropped = Atomic<UInt64>(0)

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.storage = .allocate(capacity: capacity)
        self.mutex = .allocate(capacity: 1)
        self.nonEmpty = .allocate(capacity: 1)
        pthread_mutex_init(self.mutex, nil)
        pthread_cond_init(self.nonEmpty, nil)
    }

    deinit {
        var i = self.head
        for _ in 0..<self.count {
            (self.storage + i).deinitialize(count: 1)
            i = (i + 1) % self.capacity
        }
        self.storage.deallocate()
        pthread_cond_destroy(self.nonEmpty)
        pthread_mutex_destroy(self.mutex)
        self.mutex.deallocate()
        self.nonEmpty.deallocate()
    }

    /// Elements waiting (a queue-depth gauge).
    public var depth: Int {
        pthread_mutex_lock(self.mutex)
        defer { pthread_mutex_unlock(self.mutex) }
        return self.count
    }

    /// Pushes one element; false (counted in `dropped`) when the ring is full or closed.
    @discardableResult
    public func push(_ element: Element) -> Bool {
        pthread_mutex_lock(self.mutex)
        guard !self.closed, self.count < self.capacity else {
            pthread_mutex_unlock(self.mutex)
            self.dropped.wrappingAdd(1, ordering: .relaxed)
            return false
        }
        (self.storage + (self.head + self.count) % self.capacity).initialize(to: element)
        self.count += 1
        pthread_mutex_unlock(self.mutex)
        pthread_cond_signal(self.nonEmpty)
        return true
    }

    /// Pushes the elements in order, as many as fit, under one lock; calls `refused` for each one that did not fit
    /// (counted in `dropped`) so that its resources can be returned; empties `elements` (keeping its storage).
    public func push(contentsOf elements: inout [Element], refused: (Element) -> Void) {
        guard !elements.isEmpty else { return }
        pthread_mutex_lock(self.mutex)
        let room = self.closed ? 0 : self.capacity - self.count
        let taken = min(room, elements.count)
        for i in 0..<taken {
            (self.storage + (self.head + self.count) % self.capacity).initialize(to: elements[i])
            self.count += 1
        }
        pthread_mutex_unlock(self.mutex)
        if taken > 0 { pthread_cond_signal(self.nonEmpty) }
        if taken < elements.count {
            self.dropped.wrappingAdd(UInt64(elements.count - taken), ordering: .relaxed)
            for i in taken..<elements.count { refused(elements[i]) }
        }
        elements.removeAll(keepingCapacity: true)
    }

    /// Moves up to `max` elements into `out`, waiting up to `timeoutMillis` (0: not at all) for the first one.
    /// Returns how many; 0 on timeout or when the ring is closed and empty.
    public func pop(into out: inout [Element], max: Int, timeoutMillis: Int) -> Int {
        pthread_mutex_lock(self.mutex)
        if self.count == 0 && !self.closed && timeoutMillis > 0 {
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            var deadline = now
            let ns = Int(now.tv_nsec) + (timeoutMillis % 1000) * 1_000_000
            deadline.tv_sec += timeoutMillis / 1000 + ns / 1_000_000_000
            deadline.tv_nsec = ns % 1_000_000_000
            while self.count == 0 && !self.closed {
                if pthread_cond_timedwait(self.nonEmpty, self.mutex, &deadline) == ETIMEDOUT { break }
            }
        }
        let n = min(self.count, max)
        for _ in 0..<n {
            out.append((self.storage + self.head).move())
            self.head = (self.head + 1) % self.capacity
        }
        self.count -= n
        pthread_mutex_unlock(self.mutex)
        return n
    }

    /// Takes the oldest element without waiting, if there is one.
    public func popFirst() -> Element? {
        pthread_mutex_lock(self.mutex)
        defer { pthread_mutex_unlock(self.mutex) }
        guard self.count > 0 else { return nil }
        let e = (self.storage + self.head).move()
        self.head = (self.head + 1) % self.capacity
        self.count -= 1
        return e
    }

    /// Refuses every later push and wakes every waiting consumer; what is queued can still be popped.
    public func close() {
        pthread_mutex_lock(self.mutex)
        self.closed = true
        pthread_mutex_unlock(self.mutex)
        pthread_cond_broadcast(self.nonEmpty)
    }
}
