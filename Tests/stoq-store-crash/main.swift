// stoq-store-crash ROOT: puts chunks and objects into the store at ROOT in a loop, deleting
// an object and collecting garbage every few objects, until it is killed. The crash test
// SIGKILLs it at random moments and then checks what it left behind.
//
// Each object's manifest is its chunk ids in hex, one a line, so the checker can tell a
// record that matches its own chunk list from one that does not.
import Foundation
import STOQStore

let args = CommandLine.arguments
guard args.count == 2 else {
    FileHandle.standardError.write("usage: stoq-store-crash ROOT\n".data(using: .utf8)!)
    exit(2)
}

func randomBytes(_ n: Int) -> [UInt8] {
    var g = SystemRandomNumberGenerator()
    var out = [UInt8](repeating: 0, count: n)
    out.withUnsafeMutableBytes { raw in
        var i = 0
        while i + 8 <= n { raw.storeBytes(of: g.next(), toByteOffset: i, as: UInt64.self); i += 8 }
        while i < n { raw[i] = UInt8.random(in: 0...255); i += 1 }
    }
    return out
}

do {
    // Grace 0: orphans of a previous kill (chunks put, object never written) are collected.
    let store = try ChunkStore(root: args[1], options: .init(collectGracePeriod: .zero))
    let index = try ObjectIndex(chunks: store)
    let run = String(UInt32.random(in: 0...UInt32.max), radix: 16)
    // Chunks several objects share, so dedup and "collect keeps shared chunks" are exercised.
    let shared = (0..<8).map { _ in randomBytes(Int.random(in: 1...4096)) }
    var n = 0
    while true {
        n += 1
        var ids: [ChunkID] = []
        for _ in 0..<Int.random(in: 1...6) {
            let bytes = Bool.random() ? shared.randomElement()! : randomBytes(Int.random(in: 1...65536))
            let id = ChunkID(digestOf: bytes)
            try store.put(id: id, bytes: bytes)
            ids.append(id)
        }
        let manifest = Array(ids.map(\.hex).joined(separator: "\n").utf8)
        try index.putObject("obj-\(run)-\(n)", manifest: manifest, chunkIDs: ids)
        if n % 4 == 0, let victim = try index.listObjects().randomElement() {
            try index.deleteObject(victim)
            _ = try index.collect()
        }
    }
} catch {
    FileHandle.standardError.write("stoq-store-crash: \(error)\n".data(using: .utf8)!)
    exit(1)
}
