// The one lock type of swift-xfrm: every `withLock` in the sources goes through it.
//
// Normal and release builds: `XFRMMutex` *is* the standard library's `Synchronization.Mutex` (a type alias, so no
// wrapper, no allocation, nothing added to the per-packet path).
//
// Thread-sanitizer builds (`swift build --sanitize=thread -Xswiftc -DXFRM_TSAN`): the stdlib `Mutex` takes and
// releases its futex inside the uninstrumented standard library on Linux, so ThreadSanitizer never sees the
// happens-before edge between an unlock and the next lock and reports races on correctly locked data. Under
// `XFRM_TSAN` the same API is backed by a `pthread_mutex_t`, which TSan intercepts, so correctly locked code stays
// quiet and a real race (data touched outside the lock) is reported.
#if XFRM_TSAN
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A value protected by a pthread mutex, with `Synchronization.Mutex`'s `withLock` API (the sanitizer build's
/// stand-in for it; see the top of this file).
public struct XFRMMutex<Value: ~Copyable>: ~Copyable {
    // Both live on the heap: a pthread mutex must not move, and a noncopyable struct may.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let value: UnsafeMutablePointer<Value>

    public init(_ initialValue: consuming sending Value) {
        self.mutex = .allocate(capacity: 1)
        precondition(pthread_mutex_init(self.mutex, nil) == 0, "pthread_mutex_init failed")
        self.value = .allocate(capacity: 1)
        self.value.initialize(to: initialValue)
    }

    deinit {
        self.value.deinitialize(count: 1)
        self.value.deallocate()
        pthread_mutex_destroy(self.mutex)
        self.mutex.deallocate()
    }

    /// Runs `body` with exclusive access to the value (as `Mutex.withLock`).
    public borrowing func withLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        pthread_mutex_lock(self.mutex)
        defer { pthread_mutex_unlock(self.mutex) }
        return try body(&self.value.pointee)
    }
}

extension XFRMMutex: @unchecked Sendable where Value: ~Copyable {}
#else
import Synchronization

/// The stdlib `Mutex` outside sanitizer builds (see the top of this file).
public typealias XFRMMutex<Value: ~Copyable> = Synchronization.Mutex<Value>
#endif
