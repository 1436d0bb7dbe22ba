import STOQCore

/// What a datapath queue can do, probed when it opens. The worker asks, never assumes.
public struct DatapathFeatures: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Transmit takes one buffer of several equal-size datagrams (UDP_SEGMENT).
    public static let segmentationOffload = DatapathFeatures(rawValue: 1 << 0)
    /// Receive may hand over several datagrams coalesced in one buffer (UDP_GRO).
    public static let receiveCoalescing = DatapathFeatures(rawValue: 1 << 1)
    /// ECN bits are read on receive and set on transmit.
    public static let ecn = DatapathFeatures(rawValue: 1 << 2)
    /// Receive is one long-lived multishot request over a provided-buffer ring.
    public static let multishotReceive = DatapathFeatures(rawValue: 1 << 3)
    /// Packet buffers are shared with the NIC (AF_XDP zero-copy).
    public static let zeroCopy = DatapathFeatures(rawValue: 1 << 4)

    public var description: String {
        var parts: [String] = []
        if contains(.segmentationOffload) { parts.append("gso") }
        if contains(.receiveCoalescing) { parts.append("gro") }
        if contains(.ecn) { parts.append("ecn") }
        if contains(.multishotReceive) { parts.append("multishot") }
        if contains(.zeroCopy) { parts.append("zero-copy") }
        return parts.isEmpty ? "none" : parts.joined(separator: ",")
    }
}

/// One received buffer: a datagram, or with `.receiveCoalescing` several datagrams of
/// `segmentSize` bytes back to back (the last may be shorter). Valid only inside the
/// receive callback: the bytes belong to the datapath and go back to it afterwards.
public struct ReceivedDatagrams {
    /// The bytes.
    public var bytes: UnsafeRawBufferPointer
    /// The size of each datagram in `bytes`; equal to `bytes.count` when not coalesced.
    public var segmentSize: Int
    /// Who sent them.
    public var peer: IPv6Endpoint
    /// The local address they were sent to.
    public var local: IPv6Endpoint
    /// ECN bits from the IP header.
    public var ecn: ECN

    public init(bytes: UnsafeRawBufferPointer, segmentSize: Int, peer: IPv6Endpoint, local: IPv6Endpoint, ecn: ECN) {
        self.bytes = bytes
        self.segmentSize = segmentSize
        self.peer = peer
        self.local = local
        self.ecn = ecn
    }

    /// Calls `body` once per datagram, splitting a coalesced buffer by `segmentSize`.
    @inline(__always)
    public func forEachDatagram(_ body: (UnsafeRawBufferPointer) -> Void) {
        let step = segmentSize > 0 ? segmentSize : bytes.count
        var offset = 0
        while offset < bytes.count {
            let end = min(offset + step, bytes.count)
            body(UnsafeRawBufferPointer(rebasing: bytes[offset..<end]))
            offset = end
        }
    }
}

/// Counters every datapath keeps (plain integers: a queue belongs to one worker thread).
public struct DatapathCounters: Sendable {
    public var rxDatagrams: UInt64 = 0
    /// Receive buffers handed over (less than rxDatagrams when GRO coalesces).
    public var rxBuffers: UInt64 = 0
    /// Send calls that completed (less than txDatagrams when GSO batches).
    public var txSends: UInt64 = 0
    public var rxBytes: UInt64 = 0
    public var txDatagrams: UInt64 = 0
    public var txBytes: UInt64 = 0
    /// Datagrams dropped on receive: truncated, non-IPv6, or no buffer.
    public var rxDropped: UInt64 = 0
    /// Sends the kernel refused (counted, never fatal).
    public var txErrors: UInt64 = 0
    /// Times an offload was turned off at run time because the kernel refused it.
    public var offloadFallbacks: UInt64 = 0
    public init() {}
}

/// One queue of a datapath, owned by exactly one worker thread. Nothing here is
/// thread-safe, on purpose: the worker runs to completion and never shares it.
///
/// Transmit works on slots: `reserveTransmit` lends a buffer the queue owns (so it
/// can stay in flight in the kernel), the caller writes one datagram or a run of
/// equal-size datagrams into it and `commitTransmit`s; `flush` hands every committed
/// slot to the kernel in one call.
public protocol DatapathQueue: AnyObject {
    /// Which backend this is, for logs and metrics ("io_uring", "af_xdp").
    var backendName: String { get }
    /// What the queue got when it opened (after probing).
    var features: DatapathFeatures { get }
    /// The local endpoint it is bound to.
    var localEndpoint: IPv6Endpoint { get }
    /// The largest number of datagrams one transmit slot may carry (1 without GSO).
    var maxSegmentsPerSlot: Int { get }
    /// The size of one transmit slot's buffer.
    var slotCapacity: Int { get }
    /// 0: a slot's datagrams are packed back to back (GSO). Otherwise datagram i of a
    /// slot starts at offset i × stride (AF_XDP: one UMEM frame each, headers in between).
    var transmitStride: Int { get }
    /// Counters.
    var counters: DatapathCounters { get }

    /// Waits until datagrams arrive or `timeoutNanoseconds` passes (0: do not wait),
    /// then hands every buffer of the batch to `body`. Returns the number of buffers.
    func receive(timeoutNanoseconds: UInt64, _ body: (borrowing ReceivedDatagrams) -> Void) throws -> Int

    /// A free transmit buffer of `slotCapacity` bytes, or nil when every slot is in flight
    /// (the caller should `flush` and try again later).
    func reserveTransmit() -> UnsafeMutableRawBufferPointer?

    /// Queues the reserved slot: `length` bytes to `peer`, cut into datagrams of
    /// `segmentSize` (the last may be shorter), placed as `transmitStride` says.
    func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, ecn: ECN)

    /// As `commitTransmit(length:segmentSize:to:ecn:)`, leaving from `source`: the local
    /// address the peer wrote to (`.any`: the queue's choice). A queue bound to `[::]` on a
    /// host with several addresses must honour it, or the peer sees replies from an address
    /// it never wrote to and drops them. Every queue does (AF_XDP builds its own headers from
    /// it; what a datagram from the peer last said is no guide: anyone may send one).
    func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, from source: IPv6Endpoint, ecn: ECN)

    /// Gives every committed slot to the kernel and reaps finished sends.
    func flush() throws

    /// Makes a waiting `receive` also return when `fileDescriptor` (an eventfd another
    /// worker writes to hand it datagrams; -1: none) becomes readable. The queue drains
    /// it but does not own it.
    func setWakeup(fileDescriptor: Int32)

    /// Under an Initial flood: drops what `plan` says before it reaches the worker (the empty
    /// plan: nothing). Returns false where the backend cannot shed.
    func shedInitials(_ plan: InitialShedPlan) throws(DatapathError) -> Bool

    /// Datagrams the kernel dropped for this queue's socket (shed, or its buffer was full),
    /// a 32-bit count that wraps; nil where there is no such socket.
    var kernelDrops: UInt32? { get }

    /// Releases the queue's kernel resources. Further calls are errors.
    func close()

    /// Backend-specific state worth logging (AF_XDP: bind mode, where every UMEM frame is).
    var diagnostics: [(String, String)] { get }
}

extension DatapathQueue {
    public var diagnostics: [(String, String)] { [] }
    public func commitTransmit(length: Int, segmentSize: Int, to peer: IPv6Endpoint, from source: IPv6Endpoint, ecn: ECN) {
        commitTransmit(length: length, segmentSize: segmentSize, to: peer, ecn: ecn)
    }
    public var transmitStride: Int { 0 }
    public func shedInitials(_ plan: InitialShedPlan) throws(DatapathError) -> Bool { false }
    public var kernelDrops: UInt32? { nil }
}

/// What a datapath sheds under an Initial flood: QUIC v1 Initials without a token (the rule is
/// `stoq_quic_sheddable_initial` in bpf/stoq_kern_user.h), keeping one in 2^`shift` of them at
/// random; those from a listed /64 keep one in 2^ its own shift instead. Initials with a token
/// (clients answering a Retry), every other packet and every established connection pass.
public struct InitialShedPlan: Equatable, Sendable {
    /// One /64 singled out, by its first 64 bits (`IPv6Address.prefix64`).
    public struct Rule: Equatable, Sendable {
        public var prefix: UInt64
        public var shift: Int
        public init(prefix: UInt64, shift: Int) {
            self.prefix = prefix
            self.shift = shift
        }
        /// `shift` in 0…`maxShift`, as the datapaths' C engines take it.
        public var clampedShift: UInt32 { InitialShedPlan.clamp(shift) }
    }
    /// Most /64s one plan singles out (STOQ_SHED_PREFIXES in bpf/stoq_kern_user.h; a test
    /// checks they agree).
    public static let maxRules = 4
    /// Shifts go up to this: one kept in 2^32.
    public static let maxShift = 32
    public var rules: [Rule]
    public var shift: Int
    public init(rules: [Rule] = [], shift: Int = 0) {
        self.rules = rules
        self.shift = shift
    }
    /// Sheds nothing.
    public var isEmpty: Bool { shift == 0 && rules.allSatisfy { $0.shift == 0 } }
    /// `shift` in 0…`maxShift`, as the datapaths' C engines take it.
    public var clampedShift: UInt32 { Self.clamp(shift) }
    static func clamp(_ shift: Int) -> UInt32 { UInt32(min(max(shift, 0), maxShift)) }
}

/// Why a datapath failed, with the call and errno that failed.
public struct DatapathError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure.
    public struct Code: Hashable, Sendable {
        let name: String
        public static let open = Code(name: "open")
        public static let receive = Code(name: "receive")
        public static let transmit = Code(name: "transmit")
        public static let unsupported = Code(name: "unsupported")
        /// The queue lost what it depends on at run time (AF_XDP: the XDP program was
        /// detached). The worker should move to another datapath.
        public static let detached = Code(name: "detached")
    }
    public var code: Code
    /// The system call or step that failed.
    public var operation: String
    /// errno, or 0.
    public var errno: Int32
    /// Human-readable detail.
    public var message: String

    public init(_ code: Code, operation: String, errno: Int32 = 0, message: String = "") {
        self.code = code
        self.operation = operation
        self.errno = errno
        self.message = message
    }

    /// A C engine's error, whose message starts with the call that failed: `call: detail`. The
    /// call is what precedes the first ": ", since its own text may hold colons
    /// (`bind([::1]:4433): Address already in use`).
    public init(_ code: Code, engineMessage: String) {
        let utf8 = Array(engineMessage.utf8)
        let end = utf8.indices.dropLast().first { utf8[$0] == UInt8(ascii: ":") && utf8[$0 + 1] == UInt8(ascii: " ") }
        self.init(code, operation: end.map { String(decoding: utf8[..<$0], as: UTF8.self) } ?? engineMessage, message: engineMessage)
    }

    public var description: String {
        var s = code == .detached ? "datapath detached (\(operation))" : "datapath \(code.name) failed in \(operation)"
        if errno != 0 { s += ": errno \(errno)" }
        // A message that starts with the call (an engine's) goes on from it, not repeating it.
        if !message.isEmpty { s += message.hasPrefix(operation + ": ") ? message.dropFirst(operation.count) : ": \(message)" }
        return s
    }
}
