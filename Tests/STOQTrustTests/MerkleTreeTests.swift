import Crypto
import Foundation
import Testing
@testable import STOQTrust

func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }
func unhex(_ s: String) -> [UInt8] {
    var out: [UInt8] = []
    var i = s.startIndex
    while i < s.endIndex {
        let j = s.index(i, offsetBy: 2)
        out.append(UInt8(s[i..<j], radix: 16)!)
        i = j
    }
    return out
}

@Suite struct MerkleTreeTests {
    /// Leaves of varied lengths, including the empty one: the eight of the Certificate
    /// Transparency reference tests, then 32 more.
    static let leaves: [[UInt8]] = {
        var l = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"].map(unhex)
        for i in 0..<32 { l.append((0..<(i * 7 % 41)).map { UInt8(truncatingIfNeeded: $0 * 31 + i) }) }
        return l
    }()

    struct Reference: Decodable {
        var roots: [String]
        var paths: [[Entry]]
        var proofs: [[Entry]]
        enum Entry: Decodable {
            case int(Int), hashes([String])
            init(from decoder: Decoder) throws {
                let c = try decoder.singleValueContainer()
                if let i = try? c.decode(Int.self) { self = .int(i) } else { self = .hashes(try c.decode([String].self)) }
            }
            var int: Int { if case .int(let i) = self { return i }; fatalError() }
            var hashes: [String] { if case .hashes(let h) = self { return h }; fatalError() }
        }
    }

    /// Runs Resources/rfc6962.py (an independent Python implementation of RFC 6962 §2.1).
    func pythonReference(_ leaves: [[UInt8]]) throws -> Reference {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Resources/rfc6962.py").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", script]
        let input = Pipe(), output = Pipe()
        p.standardInput = input
        p.standardOutput = output
        try p.run()
        let request = try JSONSerialization.data(withJSONObject: ["leaves": leaves.map(hex)])
        input.fileHandleForWriting.write(request)
        try input.fileHandleForWriting.close()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        return try JSONDecoder().decode(Reference.self, from: data)
    }

    @Test func matchesIndependentPythonImplementation() throws {
        let ref = try pythonReference(Self.leaves)
        let tree = MerkleTree(entries: Self.leaves)
        #expect(ref.roots.count == Self.leaves.count + 1)
        for n in 0...Self.leaves.count {
            #expect(hex(try tree.rootHash(size: n)) == ref.roots[n], "root of size \(n)")
        }
        #expect(!ref.paths.isEmpty && !ref.proofs.isEmpty)
        for p in ref.paths {
            let (m, n) = (p[0].int, p[1].int)
            #expect(try tree.inclusionProof(leafIndex: m, treeSize: n).map(hex) == p[2].hashes, "PATH(\(m), D[\(n)])")
        }
        for p in ref.proofs {
            let (m, n) = (p[0].int, p[1].int)
            #expect(try tree.consistencyProof(from: m, to: n).map(hex) == p[2].hashes, "PROOF(\(m), D[\(n)])")
        }
        // The Python reference itself agrees with the published Certificate Transparency test
        // root for the first eight leaves, so both are anchored outside this repository.
        #expect(ref.roots[8] == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
        #expect(ref.roots[0] == hex(Array(SHA256.hash(data: [UInt8]()))))
    }

    /// Flips one bit of one byte.
    func tampered(_ h: MerkleHash, _ byte: Int = 0) -> MerkleHash {
        var t = h
        t[byte % t.count] ^= 0x01
        return t
    }

    @Test func everyInclusionProofVerifiesAndTamperingFails() throws {
        let tree = MerkleTree(entries: (0..<64).map { Array("entry \($0)".utf8) })
        for n in 1...64 {
            let root = try tree.rootHash(size: n)
            for m in 0..<n {
                let leaf = tree.leafHashes[m]
                let proof = try tree.inclusionProof(leafIndex: m, treeSize: n)
                #expect(MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: m, treeSize: n, proof: proof, rootHash: root))
                // Each proof element, the leaf, the root, the index and the size matter.
                for i in proof.indices {
                    var bad = proof
                    bad[i] = tampered(bad[i], i)
                    #expect(!MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: m, treeSize: n, proof: bad, rootHash: root))
                }
                #expect(!MerkleTree.verifyInclusion(leafHash: tampered(leaf), leafIndex: m, treeSize: n, proof: proof, rootHash: root))
                #expect(!MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: m, treeSize: n, proof: proof, rootHash: tampered(root)))
                if n > 1 {
                    #expect(!MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: (m + 1) % n, treeSize: n, proof: proof, rootHash: root))
                }
                // The size is bound to the root by the signed tree head, not by the proof, so
                // the check is against the other size's root.
                if n < 64 {
                    let next = try tree.rootHash(size: n + 1)
                    #expect(!MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: m, treeSize: n + 1, proof: proof, rootHash: next))
                }
                #expect(!MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: m, treeSize: n, proof: proof + [root], rootHash: root))
                if !proof.isEmpty {
                    #expect(!MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: m, treeSize: n, proof: proof.dropLast(), rootHash: root))
                }
                #expect(!MerkleTree.verifyInclusion(leafHash: leaf, leafIndex: n, treeSize: n, proof: proof, rootHash: root))
            }
        }
    }

    @Test func everyConsistencyProofVerifiesAndTamperingFails() throws {
        let tree = MerkleTree(entries: (0..<64).map { Array("entry \($0)".utf8) })
        let roots = try (0...64).map { try tree.rootHash(size: $0) }
        for n in 1...64 {
            for m in 0...n {
                let proof = try tree.consistencyProof(from: m, to: n)
                #expect(
                    MerkleTree.verifyConsistency(oldSize: m, newSize: n, oldRoot: roots[m], newRoot: roots[n], proof: proof),
                    "PROOF(\(m), \(n))")
                guard m > 0, m < n else { continue }
                for i in proof.indices {
                    var bad = proof
                    bad[i] = tampered(bad[i], i)
                    #expect(!MerkleTree.verifyConsistency(oldSize: m, newSize: n, oldRoot: roots[m], newRoot: roots[n], proof: bad))
                }
                #expect(!MerkleTree.verifyConsistency(oldSize: m, newSize: n, oldRoot: tampered(roots[m]), newRoot: roots[n], proof: proof))
                #expect(!MerkleTree.verifyConsistency(oldSize: m, newSize: n, oldRoot: roots[m], newRoot: tampered(roots[n]), proof: proof))
                #expect(!MerkleTree.verifyConsistency(oldSize: m, newSize: n, oldRoot: roots[m], newRoot: roots[n], proof: proof.dropLast()))
                #expect(!MerkleTree.verifyConsistency(oldSize: m, newSize: n, oldRoot: roots[m], newRoot: roots[n], proof: proof + [roots[n]]))
                #expect(!MerkleTree.verifyConsistency(oldSize: m, newSize: n, oldRoot: roots[m], newRoot: roots[n], proof: []))
                // The proof is for these sizes only.
                if n < 64 {
                    #expect(!MerkleTree.verifyConsistency(oldSize: m, newSize: n + 1, oldRoot: roots[m], newRoot: roots[n + 1], proof: proof))
                }
            }
        }
        // Equal sizes: consistent only with an empty proof and equal roots.
        #expect(!MerkleTree.verifyConsistency(oldSize: 5, newSize: 5, oldRoot: roots[5], newRoot: roots[6], proof: []))
        #expect(!MerkleTree.verifyConsistency(oldSize: 5, newSize: 4, oldRoot: roots[5], newRoot: roots[4], proof: []))
    }

    @Test func rejectsOutOfRangeRequests() throws {
        let tree = MerkleTree(entries: (0..<4).map { [UInt8($0)] })
        #expect(try tree.rootHash(size: 0) == MerkleTree.emptyRootHash)
        #expect(throws: TransparencyLogError(.invalidTreeSize, "tree size 5 is outside 0…4")) { try tree.rootHash(size: 5) }
        #expect(throws: TransparencyLogError(.invalidLeafIndex, "leaf index 4 is outside 0…3")) {
            try tree.inclusionProof(leafIndex: 4)
        }
        #expect(throws: TransparencyLogError(.invalidTreeSize, "old tree size 5 is outside 0…4")) {
            try tree.consistencyProof(from: 5, to: 4)
        }
    }
}
