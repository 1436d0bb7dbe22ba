// libFuzzer target for a worker's packet path, as a hostile Internet reaches it: datagrams into
// QUICEndpoint.handle (STOQ's Swift endpoint and its C shim over ngtcp2, GnuTLS and nghttp3),
// timers run on a manual clock, and everything the endpoint transmits taken out and accounted.
// Only the datapath's syscalls are left out (the worker's loop adds nothing else per datagram).
// Not part of the package build: `scripts/fuzz worker` recompiles STOQQUIC and the C shim
// (Sources/CNgtcp2) with coverage and links the rest from the debug build.
//
// The fuzzer cannot finish a handshake (it holds no keys the server would accept), so what it
// reaches is everything before one: header parsing and connection-ID routing, version
// negotiation, stateless resets, Retry and its tokens, Initial decryption, frames in Initial
// packets, the TLS ClientHello and its QUIC transport parameters, connection limits and the
// handshake and idle timers. To get past the AEAD, the harness protects Initials itself (RFC
// 9001 §5: keys from the packet's destination connection ID), so the fuzzer writes their
// plaintext frames (a CRYPTO frame with a ClientHello reaches GnuTLS).
//
// Input: byte 0 bit 0 picks the server with `retry = true`. Then records, each an opcode byte
// (mod 4) and its operands; a record cut short by the end of the input is dropped:
//   0 datagram:  source (1 byte), length (2, little endian), the bytes as they are
//   1 Initial:   source (1), DCID length (1, mod 21) + DCID, SCID length (1, mod 21) + SCID,
//                token length (1) + token, packet-number length and padding (1: bits 0-1 are the
//                length - 1, bit 2 pads the datagram to 1200 bytes), packet number (4),
//                frames length (2, little endian) + the plaintext frames
//   2 wait:      milliseconds (1 byte b: (b + 1)², up to 65.5 s), then the due timers run
//   3 replay:    source (1): the last datagram sent again from another address
// A source byte s names the client [fd00::s>>4]:(40000 + s & 15).
//
// Properties: the server never sends an address more than three times what it received from
// it (RFC 9000 §8.1: no address is ever validated here); once every timer has run out, no
// connection is left; and nothing crashes (ASan).

import Crypto
import Foundation
import STOQCore
import STOQTrust
import _CryptoExtras

@testable import STOQQUIC

/// One endpoint per Retry setting, for the whole run (as a worker lives across connections),
/// on a clock that only moves forward.
private final class Harness {
    let servers: [QUICEndpoint]
    var now: Timestamp = 1_000_000_000
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
    let serverAddress = IPv6Endpoint(address: IPv6Address("fd00::1")!, port: 4433)

    init() {
        let directory = NSTemporaryDirectory() + "stoq-fuzz-worker-\(getpid())"
        do {
            let identity = try EmbeddedIdentity.loadOrCreate(
                in: directory, names: ["stoq.fuzz"], addresses: [IPv6Address("fd00::1")!])
            let credentials = try TLSCredentials(certificateFile: identity.certificatePath, keyFile: identity.keyPath)
            let secret = StaticSecret.random()
            servers = [false, true].map { retry in
                var settings = QUICSettings()
                settings.retry = retry
                settings.maxConnections = 64
                return QUICEndpoint(isServer: true, credentials: credentials, settings: settings, workerID: 0, secret: secret)
            }
        } catch {
            fatalError("worker fuzz: cannot make the server's identity in \(directory): \(error)")
        }
    }
}

// libFuzzer calls the target on one thread.
nonisolated(unsafe) private let harness = Harness()
/// STOQ_FUZZ_VERBOSE=1: print what each input sent and got (to check what seeds reach).
private let verbose = ProcessInfo.processInfo.environment["STOQ_FUZZ_VERBOSE"] != nil

/// The client a source byte names.
private func source(_ s: UInt8) -> IPv6Endpoint {
    IPv6Endpoint(address: IPv6Address("fd00::\(String(s >> 4 + 2, radix: 16))")!, port: 40000 + UInt16(s & 15))
}

/// Reads the input front to back; every read fails (nil) past its end.
private struct Reader {
    let data: UnsafeBufferPointer<UInt8>
    var offset = 0
    mutating func byte() -> UInt8? {
        guard offset < data.count else { return nil }
        defer { offset += 1 }
        return data[offset]
    }
    mutating func bytes(_ n: Int) -> [UInt8]? {
        guard n <= data.count - offset else { return nil }
        defer { offset += n }
        return Array(data[offset..<offset + n])
    }
    mutating func u16() -> Int? { bytes(2).map { Int($0[0]) | Int($0[1]) << 8 } }
}

// MARK: Initial packet protection (RFC 9001 §5), client side

private let initialSaltV1: [UInt8] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a,
]

/// HKDF-Expand-Label (RFC 8446 §7.1) with an empty context.
private func expandLabel(_ secret: SymmetricKey, _ label: String, _ length: Int) -> SymmetricKey {
    let full = Array("tls13 \(label)".utf8)
    let info = [UInt8(length >> 8), UInt8(length & 0xff), UInt8(full.count)] + full + [0]
    return HKDF<SHA256>.expand(pseudoRandomKey: secret, info: info, outputByteCount: length)
}

private func varint(_ v: Int) -> [UInt8] {
    v < 64 ? [UInt8(v)] : [UInt8(0x40 | v >> 8), UInt8(v & 0xff)]  // every length here is < 16384
}

/// A client's Initial keys: packet key, IV and header-protection key.
private struct InitialKeys {
    let key: SymmetricKey, iv: SymmetricKey, hp: SymmetricKey

    init(dcid: [UInt8]) {
        let prk = HKDF<SHA256>.extract(inputKeyMaterial: SymmetricKey(data: dcid), salt: initialSaltV1)
        let client = expandLabel(SymmetricKey(data: Array(prk)), "client in", 32)
        key = expandLabel(client, "quic key", 16)
        iv = expandLabel(client, "quic iv", 12)
        hp = expandLabel(client, "quic hp", 16)
    }
}

/// Keys by DCID: deriving them was most of an execution's time, and mutations keep DCIDs.
nonisolated(unsafe) private var initialKeys: [[UInt8]: InitialKeys] = [:]

private func keys(for dcid: [UInt8]) -> InitialKeys {
    if let known = initialKeys[dcid] { return known }
    if initialKeys.count >= 4096 { initialKeys.removeAll(keepingCapacity: true) }
    let derived = InitialKeys(dcid: dcid)
    initialKeys[dcid] = derived
    return derived
}

/// A client Initial carrying `frames`, protected with the keys its DCID gives.
private func sealInitial(dcid: [UInt8], scid: [UInt8], token: [UInt8], pnLength: Int, pn: UInt32, frames: [UInt8], pad: Bool)
    -> [UInt8]
{
    let protection = keys(for: dcid)

    var header: [UInt8] = [0xc0 | UInt8(pnLength - 1), 0, 0, 0, 1, UInt8(dcid.count)] + dcid + [UInt8(scid.count)] + scid
    header += varint(token.count) + token
    var payload = frames
    // The sample for header protection needs 4 bytes past the packet number's start.
    let headerSoFar = header.count + 2 + pnLength
    let minimum = pad ? max(1200 - headerSoFar - 16, 0) : 0
    payload += [UInt8](repeating: 0, count: max(max(minimum, 4 - pnLength) - payload.count, 0))
    header += varint(pnLength + payload.count + 16)
    let pnOffset = header.count
    for i in 0..<pnLength { header.append(UInt8(truncatingIfNeeded: pn >> (8 * UInt32(pnLength - 1 - i)))) }

    var nonce = protection.iv.withUnsafeBytes { Array($0) }
    for i in 0..<4 { nonce[8 + i] ^= UInt8(truncatingIfNeeded: pn >> (8 * UInt32(3 - i))) }
    guard let box = try? AES.GCM.seal(payload, using: protection.key, nonce: AES.GCM.Nonce(data: nonce), authenticating: header) else {
        fatalError("worker fuzz: AES-GCM refused a 12-byte nonce")
    }
    var packet = header + Array(box.ciphertext) + Array(box.tag)
    var mask = Array(packet[(pnOffset + 4)..<(pnOffset + 20)])
    do { try AES.permute(&mask, key: protection.hp) } catch { fatalError("worker fuzz: AES permute: \(error)") }
    packet[0] ^= mask[0] & 0x0f
    for i in 0..<pnLength { packet[pnOffset + i] ^= mask[1 + i] }
    return packet
}

// MARK: The target

@_cdecl("LLVMFuzzerTestOneInput")
public func workerFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size >= 1 else { return 0 }
    let h = harness
    let server = h.servers[Int(data[0] & 1)]
    var input = Reader(data: UnsafeBufferPointer(start: data, count: size), offset: 1)
    var received: [IPv6Endpoint: Int] = [:]
    var sent: [IPv6Endpoint: Int] = [:]
    var last: [UInt8]?

    func deliver(_ bytes: [UInt8], from: IPv6Endpoint) {
        received[from, default: 0] += bytes.count
        last = bytes
        bytes.withUnsafeBytes { server.handle(datagram: $0, from: from, to: h.serverAddress, ecn: .notECT, now: h.now) }
        drain()
    }
    func drain() {
        while let t = server.pollTransmit(into: h.buffer, maxSegments: 16, now: h.now) {
            sent[t.destination, default: 0] += t.length
            let limit = 3 * received[t.destination, default: 0]
            guard sent[t.destination]! <= limit else {
                fatalError("sent \(sent[t.destination]!) bytes to \(t.destination), which sent \(limit / 3): over 3×")
            }
        }
    }

    records: while let op = input.byte() {
        switch op % 4 {
        case 0:
            guard let s = input.byte(), let n = input.u16(), let bytes = input.bytes(min(n, 1500)) else { break records }
            deliver(bytes, from: source(s))
        case 1:
            guard let s = input.byte(), let dl = input.byte(), let dcid = input.bytes(Int(dl % 21)),
                let sl = input.byte(), let scid = input.bytes(Int(sl % 21)), let tl = input.byte(),
                let token = input.bytes(Int(tl)), let shape = input.byte(), let pn = input.bytes(4),
                let fl = input.u16(), let frames = input.bytes(min(fl, 1400))
            else { break records }
            let number = pn.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            deliver(
                sealInitial(
                    dcid: dcid, scid: scid, token: token, pnLength: Int(shape & 3) + 1, pn: number, frames: frames,
                    pad: shape & 4 != 0),
                from: source(s))
        case 2:
            guard let b = input.byte() else { break records }
            h.now += (UInt64(b) + 1) * (UInt64(b) + 1) * 1_000_000
            server.handleTimeouts(now: h.now)
            drain()
        default:
            guard let s = input.byte(), let bytes = last else { break records }
            deliver(bytes, from: source(s))
        }
    }

    if verbose {
        print(
            "worker fuzz: received \(received.map { "\($0.key) \($0.value)" }.sorted()); sent \(sent.map { "\($0.key) \($0.value)" }.sorted()); \(server.connectionCount) connection(s) open"
        )
    }
    // Every connection must end by its timers alone: handshake and idle timeouts, then closing.
    for _ in 0..<64 where server.connectionCount > 0 {
        guard let next = server.nextTimeout() else {
            fatalError("\(server.connectionCount) connection(s) left with no timer to end them")
        }
        h.now = max(h.now, next)
        server.handleTimeouts(now: h.now)
        drain()
    }
    guard server.connectionCount == 0 else { fatalError("\(server.connectionCount) connection(s) still open after 64 timer runs") }
    return 0
}
