/// The SAs of one hash chain, newest first (≈ an hlist bucket). Nearly every chain holds one SA (an SPI's SAs differ
/// only by mark; an output chain is one tunnel's SA plus the occasional rekeyed one), so one SA is kept inline and an
/// array exists only from the second: at 100,000 SAs that is one allocation less per SA and per index.
struct SAChain: Sequence {
    fileprivate enum Storage {
        case one(SecurityAssociation)
        case many([SecurityAssociation])
    }
    private var storage: Storage

    init(_ sa: SecurityAssociation) { self.storage = .one(sa) }

    /// Links `sa` in front (it is the newest).
    mutating func prepend(_ sa: SecurityAssociation) {
        switch self.storage {
        case .one(let first): self.storage = .many([sa, first])
        case .many(var list):
            self.storage = .one(sa)  // keep the array uniquely referenced while it grows
            list.insert(sa, at: 0)
            self.storage = .many(list)
        }
    }

    /// The chain without this very SA: nil when it held only `sa`; unchanged when `sa` is not in it.
    func removing(_ sa: SecurityAssociation) -> SAChain? {
        switch self.storage {
        case .one(let x): return x === sa ? nil : self
        case .many(var list):
            guard let i = list.firstIndex(where: { $0 === sa }) else { return self }
            list.remove(at: i)
            var rest = SAChain(list[0])
            if list.count > 1 { rest.storage = .many(list) }
            return rest
        }
    }

    struct Iterator: IteratorProtocol {
        private let storage: Storage
        private var index = 0

        fileprivate init(_ storage: Storage) { self.storage = storage }

        @inline(__always)
        mutating func next() -> SecurityAssociation? {
            defer { self.index += 1 }
            switch self.storage {
            case .one(let sa): return self.index == 0 ? sa : nil
            case .many(let list): return self.index < list.count ? list[self.index] : nil
            }
        }
    }

    @inline(__always)
    func makeIterator() -> Iterator { Iterator(self.storage) }
}

extension Dictionary where Value == SAChain {
    /// Links `sa` in front of the chain under `key`, creating it.
    mutating func link(_ sa: SecurityAssociation, under key: Key) {
        if self[key] == nil { self[key] = SAChain(sa) } else { self[key]!.prepend(sa) }
    }

    /// Unlinks this very SA from the chain under `key`; drops the chain when it empties. Returns whether it was there.
    @discardableResult
    mutating func unlink(_ sa: SecurityAssociation, under key: Key) -> Bool {
        guard let chain = self[key], chain.contains(where: { $0 === sa }) else { return false }
        self[key] = chain.removing(sa)
        return true
    }
}
