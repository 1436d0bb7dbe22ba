import Crypto
import Foundation

/// A log's signed commitment to its contents at one moment: (tree size, timestamp, root hash)
/// signed with the log's ECDSA P-256 key.
///
/// The signed bytes follow RFC 6962 §3.5 `TreeHeadSignature` (version v1, signature type
/// tree_hash, timestamp, tree_size, sha256_root_hash), so the layout is one other tools know.
public struct SignedTreeHead: Sendable, Equatable, Codable {
    /// The number of entries the head covers.
    public var treeSize: UInt64
    /// Milliseconds since the Unix epoch at which the head was signed.
    public var timestamp: UInt64
    /// The Merkle tree hash of the first `treeSize` entries.
    public var rootHash: MerkleHash
    /// DER-encoded ECDSA P-256 / SHA-256 signature over `signedBytes`.
    public var signature: [UInt8]

    /// Signs a tree head.
    public static func sign(
        treeSize: UInt64, timestamp: UInt64, rootHash: MerkleHash,
        key: P256.Signing.PrivateKey
    ) throws -> SignedTreeHead {
        let tbs = signedBytes(treeSize: treeSize, timestamp: timestamp, rootHash: rootHash)
        let sig = try key.signature(for: tbs)
        return SignedTreeHead(
            treeSize: treeSize, timestamp: timestamp, rootHash: rootHash,
            signature: Array(sig.derRepresentation))
    }

    /// Creates a tree head from its parts (for example, as received from a peer).
    public init(treeSize: UInt64, timestamp: UInt64, rootHash: MerkleHash, signature: [UInt8]) {
        self.treeSize = treeSize
        self.timestamp = timestamp
        self.rootHash = rootHash
        self.signature = signature
    }

    /// The bytes the signature covers.
    public var signedBytes: [UInt8] { Self.signedBytes(treeSize: treeSize, timestamp: timestamp, rootHash: rootHash) }

    static func signedBytes(treeSize: UInt64, timestamp: UInt64, rootHash: MerkleHash) -> [UInt8] {
        var b: [UInt8] = [0, 1]  // version v1(0), signature_type tree_hash(1)
        b.reserveCapacity(2 + 8 + 8 + rootHash.count)
        for shift in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: timestamp >> UInt64(shift))) }
        for shift in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: treeSize >> UInt64(shift))) }
        b += rootHash
        return b
    }

    /// True when the signature is the log key's over these exact values.
    public func verify(with publicKey: P256.Signing.PublicKey) -> Bool {
        guard rootHash.count == 32, let sig = try? P256.Signing.ECDSASignature(derRepresentation: signature) else {
            return false
        }
        return publicKey.isValidSignature(sig, for: signedBytes)
    }
}
