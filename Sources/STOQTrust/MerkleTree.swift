import Crypto
import Foundation

/// A Merkle tree hash: 32 bytes of SHA-256.
public typealias MerkleHash = [UInt8]

/// The Merkle tree of RFC 6962 §2.1 (unchanged in RFC 9162 §2.1): leaf hashes, the tree head
/// of any prefix, inclusion proofs (PATH) and consistency proofs (PROOF), plus the verification
/// algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2.
///
/// Only leaf hashes are kept, so the tree of a log costs 32 bytes per entry. Tree heads are
/// recomputed from the leaves (O(n) per call): simple and obviously right, which matters more
/// than speed while logs hold thousands of certificates rather than billions.
public struct MerkleTree: Sendable, Equatable {
    /// The leaf hashes, in append order.
    public private(set) var leafHashes: [MerkleHash] = []

    /// An empty tree.
    public init() {}

    /// A tree over `entries`, in order.
    public init<S: Sequence>(entries: S) where S.Element: DataProtocol {
        for e in entries { append(e) }
    }

    /// The number of leaves.
    public var size: Int { leafHashes.count }

    /// Appends an entry and returns its leaf index.
    @discardableResult
    public mutating func append(_ entry: some DataProtocol) -> Int {
        leafHashes.append(Self.leafHash(entry))
        return leafHashes.count - 1
    }

    /// Appends an already computed leaf hash and returns its leaf index.
    @discardableResult
    public mutating func append(leafHash: MerkleHash) -> Int {
        precondition(leafHash.count == 32, "a leaf hash is 32 bytes")
        leafHashes.append(leafHash)
        return leafHashes.count - 1
    }

    /// Drops every leaf from index `size` on (used when a log reload truncates a torn record).
    mutating func truncate(to size: Int) {
        leafHashes.removeSubrange(size...)
    }

    // MARK: hashing (RFC 6962 §2.1): the 0x00 / 0x01 prefixes keep a leaf from passing as a node.

    /// `SHA-256(0x00 || entry)`.
    public static func leafHash(_ entry: some DataProtocol) -> MerkleHash {
        var h = SHA256()
        h.update(data: [0x00])
        h.update(data: entry)
        return Array(h.finalize())
    }

    /// `SHA-256(0x01 || left || right)`.
    public static func nodeHash(_ left: MerkleHash, _ right: MerkleHash) -> MerkleHash {
        var h = SHA256()
        h.update(data: [0x01])
        h.update(data: left)
        h.update(data: right)
        return Array(h.finalize())
    }

    /// The tree head of the empty tree: `SHA-256()` of nothing.
    public static let emptyRootHash: MerkleHash = Array(SHA256.hash(data: [UInt8]()))

    /// The largest power of two strictly smaller than `n` (n ≥ 2): where MTH splits a range.
    static func split(_ n: Int) -> Int {
        var k = 1
        while k << 1 < n { k <<= 1 }
        return k
    }

    // MARK: tree heads and proofs

    /// The Merkle tree hash (MTH) of the first `treeSize` leaves (default: all of them).
    public func rootHash(size treeSize: Int? = nil) throws -> MerkleHash {
        let n = treeSize ?? size
        guard n >= 0, n <= size else {
            throw TransparencyLogError(.invalidTreeSize, "tree size \(n) is outside 0…\(size)")
        }
        return n == 0 ? Self.emptyRootHash : mth(0, n)
    }

    /// MTH(D[lo:hi]) for a non-empty range.
    private func mth(_ lo: Int, _ hi: Int) -> MerkleHash {
        let n = hi - lo
        if n == 1 { return leafHashes[lo] }
        let k = Self.split(n)
        return Self.nodeHash(mth(lo, lo + k), mth(lo + k, hi))
    }

    /// The inclusion proof (RFC 6962 §2.1.1 PATH) of leaf `leafIndex` in the tree of the
    /// first `treeSize` leaves, ordered from the leaf's sibling up to the root's child.
    public func inclusionProof(leafIndex: Int, treeSize: Int? = nil) throws -> [MerkleHash] {
        let n = treeSize ?? size
        guard n >= 1, n <= size else {
            throw TransparencyLogError(.invalidTreeSize, "tree size \(n) is outside 1…\(size)")
        }
        guard leafIndex >= 0, leafIndex < n else {
            throw TransparencyLogError(.invalidLeafIndex, "leaf index \(leafIndex) is outside 0…\(n - 1)")
        }
        var proof: [MerkleHash] = []
        path(leafIndex, 0, n, into: &proof)
        return proof
    }

    /// PATH(m, D[lo:hi]); the recursion appends deepest-first, which is the order RFC 6962 lists.
    private func path(_ m: Int, _ lo: Int, _ hi: Int, into proof: inout [MerkleHash]) {
        let n = hi - lo
        if n == 1 { return }
        let k = Self.split(n)
        if m < k {
            path(m, lo, lo + k, into: &proof)
            proof.append(mth(lo + k, hi))
        } else {
            path(m - k, lo + k, hi, into: &proof)
            proof.append(mth(lo, lo + k))
        }
    }

    /// The consistency proof (RFC 6962 §2.1.2 PROOF) that the tree of the first `oldSize`
    /// leaves is a prefix of the tree of the first `newSize` leaves. Empty when
    /// `oldSize` is 0 or equals `newSize`: there is nothing to prove.
    public func consistencyProof(from oldSize: Int, to newSize: Int? = nil) throws -> [MerkleHash] {
        let n = newSize ?? size
        guard n >= 0, n <= size else {
            throw TransparencyLogError(.invalidTreeSize, "tree size \(n) is outside 0…\(size)")
        }
        guard oldSize >= 0, oldSize <= n else {
            throw TransparencyLogError(.invalidTreeSize, "old tree size \(oldSize) is outside 0…\(n)")
        }
        if oldSize == 0 || oldSize == n { return [] }
        var proof: [MerkleHash] = []
        subproof(oldSize, 0, n, complete: true, into: &proof)
        return proof
    }

    /// SUBPROOF(m, D[lo:hi], b).
    private func subproof(_ m: Int, _ lo: Int, _ hi: Int, complete: Bool, into proof: inout [MerkleHash]) {
        let n = hi - lo
        if m == n {
            // The old tree is this whole subtree: the verifier knows its hash only if it is
            // not the complete old tree (b = false).
            if !complete { proof.append(mth(lo, hi)) }
            return
        }
        let k = Self.split(n)
        if m <= k {
            subproof(m, lo, lo + k, complete: complete, into: &proof)
            proof.append(mth(lo + k, hi))
        } else {
            subproof(m - k, lo + k, hi, complete: false, into: &proof)
            proof.append(mth(lo, lo + k))
        }
    }

    // MARK: verification (RFC 9162 §2.1.3.2, §2.1.4.2)

    /// True when `proof` shows that `leafHash` is leaf `leafIndex` of the tree of size
    /// `treeSize` whose head is `rootHash`.
    public static func verifyInclusion(
        leafHash: MerkleHash, leafIndex: Int, treeSize: Int,
        proof: [MerkleHash], rootHash: MerkleHash
    ) -> Bool {
        guard leafIndex >= 0, leafIndex < treeSize else { return false }
        var fn = leafIndex, sn = treeSize - 1
        var r = leafHash
        for p in proof {
            if sn == 0 { return false }
            if fn & 1 == 1 || fn == sn {
                r = nodeHash(p, r)
                // A right-edge node with no right sibling at this level: climb until the
                // path turns, since those levels contribute no proof element.
                while fn & 1 == 0 && fn != 0 { fn >>= 1; sn >>= 1 }
            } else {
                r = nodeHash(r, p)
            }
            fn >>= 1
            sn >>= 1
        }
        return sn == 0 && r == rootHash
    }

    /// True when `proof` shows that the tree of size `oldSize` with head `oldRoot` is a
    /// prefix of the tree of size `newSize` with head `newRoot`.
    public static func verifyConsistency(
        oldSize: Int, newSize: Int, oldRoot: MerkleHash, newRoot: MerkleHash,
        proof: [MerkleHash]
    ) -> Bool {
        guard oldSize >= 0, oldSize <= newSize else { return false }
        // Trivial cases RFC 9162 leaves to the caller: nothing to prove, so the proof must be empty.
        if oldSize == 0 { return proof.isEmpty }
        if oldSize == newSize { return proof.isEmpty && oldRoot == newRoot }
        guard !proof.isEmpty else { return false }
        var path = proof
        // When the old tree is a complete subtree, its head is the proof's implicit first node.
        if oldSize & (oldSize - 1) == 0 { path.insert(oldRoot, at: 0) }
        var fn = oldSize - 1, sn = newSize - 1
        while fn & 1 == 1 { fn >>= 1; sn >>= 1 }
        var fr = path[0], sr = path[0]
        for c in path.dropFirst() {
            if sn == 0 { return false }
            if fn & 1 == 1 || fn == sn {
                fr = nodeHash(c, fr)
                sr = nodeHash(c, sr)
                while fn & 1 == 0 && fn != 0 { fn >>= 1; sn >>= 1 }
            } else {
                sr = nodeHash(sr, c)
            }
            fn >>= 1
            sn >>= 1
        }
        return fr == oldRoot && sr == newRoot && sn == 0
    }
}
