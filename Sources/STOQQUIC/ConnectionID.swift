/// A QUIC connection ID (0–20 bytes), stored inline so that table lookups on the
/// packet path never allocate.
public struct ConnectionID: Hashable, Sendable, CustomStringConvertible {
    var a: UInt64 = 0
    var b: UInt64 = 0
    var c: UInt32 = 0
    /// Number of bytes, 0...20.
    public private(set) var count: UInt8 = 0

    /// The empty connection ID.
    public init() {}

    /// Copies up to 20 bytes.
    public init(_ bytes: UnsafeRawBufferPointer) {
        let n = min(bytes.count, 20)
        count = UInt8(n)
        var storage: (UInt64, UInt64, UInt32) = (0, 0, 0)
        withUnsafeMutableBytes(of: &storage) { dst in
            dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[0..<n]))
        }
        a = storage.0
        b = storage.1
        c = storage.2
    }

    /// Copies from a C pointer and length.
    public init(pointer: UnsafePointer<UInt8>, count: Int) {
        self.init(UnsafeRawBufferPointer(start: pointer, count: count))
    }

    /// The bytes.
    public var bytes: [UInt8] {
        var storage = (a, b, c)
        return withUnsafeBytes(of: &storage) { Array($0.prefix(Int(count))) }
    }

    /// The worker that issued it (STOQ puts the worker id in byte 0).
    public var workerID: UInt8 { UInt8(truncatingIfNeeded: a) }

    /// The most workers a node can have: a worker's id is one byte of every connection ID it
    /// issues (`STOQ_CID_WORKER_BYTE`), by which the XDP program and the other workers steer.
    public static let maxWorkers = 256

    public var description: String {
        bytes.map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }
}

extension String {
    func leftPadded(to n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
