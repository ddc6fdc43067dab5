// The storage of a Left-Right copy that changes by small edits: an array that remembers which elements a change
// wrote, so that the other copy is brought up to date by copying just those (`replicate`) instead of running the
// change again. For the SPD's radix trees this is the difference between walking a 1,000,000-policy tree twice per
// insert (each step a cache miss) and walking it once plus copying the handful of nodes the insert wrote.
//
// Protocol (see LeftRight.write): a change runs on a copy whose `dirty` list is empty; afterwards `dirty` names
// every element it wrote or appended. `replicate(from:)` is then called on the other copy: it forgets that copy's
// own (already replicated) list and copies the listed elements. Elements that hold copy-on-write buffers (the
// candidate lists) end up sharing those buffers between the copies, which is safe: a later in-place edit of a shared
// buffer copies it first (it is not uniquely referenced), so the copy readers are on never changes under them.

struct TrackedArray<Element> {
    private(set) var elements: ContiguousArray<Element> = []
    /// Elements written since this copy last received a replication (duplicates allowed).
    private var dirty: [Int32] = []

    /// Both copies must start from equal `elements`.
    init(_ elements: ContiguousArray<Element> = []) {
        self.elements = elements
    }


    var count: Int { self.elements.count }

    subscript(_ i: Int) -> Element {
        @inline(__always) get { self.elements[i] }
        @inline(__always) _modify {
            self.dirty.append(Int32(i))
            yield &self.elements[i]
        }
    }

    mutating func append(_ e: Element) {
        self.dirty.append(Int32(self.elements.count))
        self.elements.append(e)
    }

    /// Brings this copy to `live`'s contents, given that they differed only in the elements `live` lists as dirty.
    mutating func replicate(from live: borrowing TrackedArray<Element>) {
        self.dirty.removeAll(keepingCapacity: true)
        let source = live.elements
        for i in live.dirty {
            let i = Int(i)
            while self.elements.count <= i { self.elements.append(source[self.elements.count]) }
            self.elements[i] = source[i]
        }
    }
}

extension TrackedArray: Equatable where Element: Equatable {
    static func == (a: Self, b: Self) -> Bool { a.elements == b.elements }
}

/// A stack of free ids kept in a TrackedArray (pushes and pops are element writes, so they replicate too).
struct TrackedIDStack: Equatable {
    private var storage = TrackedArray<Int32>()
    private(set) var count = 0

    mutating func push(_ id: Int32) {
        if self.count < self.storage.count { self.storage[self.count] = id } else { self.storage.append(id) }
        self.count += 1
    }

    mutating func pop() -> Int32? {
        if self.count == 0 { return nil }
        self.count -= 1
        return self.storage[self.count]
    }

    mutating func replicate(from live: borrowing TrackedIDStack) {
        self.storage.replicate(from: live.storage)
        self.count = live.count
    }

    static func == (a: Self, b: Self) -> Bool {
        a.count == b.count && a.storage.elements.prefix(a.count) == b.storage.elements.prefix(b.count)
    }
}
