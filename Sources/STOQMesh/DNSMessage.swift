import STOQCore

/// The few DNS messages discovery needs (RFC 1035, RFC 2782 SRV, RFC 3596 AAAA, RFC 6891 EDNS):
/// one question out, one answer in. The parser is strict because the answer comes off the
/// network: every length is checked against the message, a compression pointer must point
/// before the name that uses it (so it cannot loop), names are at most 255 bytes, and anything
/// left over or cut short refuses the whole answer.
enum DNSMessage {
    static let typeAAAA: UInt16 = 28
    static let typeSRV: UInt16 = 33
    static let typeCNAME: UInt16 = 5
    static let typeOPT: UInt16 = 41
    static let classIN: UInt16 = 1
    /// What we tell the server we can take over UDP (EDNS); more comes over TCP.
    static let udpPayload: UInt16 = 4096

    enum RCode: UInt8 {
        case noError = 0, formatError = 1, serverFailure = 2, nameError = 3, notImplemented = 4, refused = 5
    }

    /// What one record says.
    enum RData: Hashable {
        case aaaa(IPv6Address)
        case srv(priority: UInt16, weight: UInt16, port: UInt16, target: String)
        case cname(String)
        case other
    }

    struct Record: Hashable {
        /// Lowercase, no trailing dot.
        var owner: String
        var type: UInt16
        var data: RData
    }

    struct Response {
        var rcode: UInt8
        var truncated: Bool
        var answers: [Record]
        var additional: [Record]
    }

    /// `name` in canonical form: lowercase, no trailing dot.
    static func canonical(_ name: String) -> String {
        var n = Substring(name.lowercased())
        if n.last == "." { n = n.dropLast() }
        return String(n)
    }

    /// A recursive query for `name`/`type`, with an EDNS OPT record offering `udpPayload` bytes.
    static func query(id: UInt16, name: String, type: UInt16) -> [UInt8] {
        var m: [UInt8] = []
        m.reserveCapacity(64)
        func u16(_ v: UInt16) { m.append(UInt8(v >> 8)); m.append(UInt8(v & 0xFF)) }
        u16(id)
        u16(0x0100)  // RD
        u16(1); u16(0); u16(0); u16(1)
        for label in canonical(name).split(separator: ".") {
            m.append(UInt8(label.utf8.count))
            m.append(contentsOf: label.utf8)
        }
        m.append(0)
        u16(type); u16(classIN)
        m.append(0)  // OPT: root owner
        u16(typeOPT); u16(udpPayload)
        m.append(contentsOf: [0, 0, 0, 0])  // extended rcode, version 0, flags
        u16(0)
        return m
    }

    /// Parses the answer to `query(id:name:type:)`: the id, the flags and the question must
    /// match it. Throws `.malformed` naming what was wrong.
    static func parse(_ bytes: [UInt8], id: UInt16, name: String, type: UInt16) throws(DiscoveryError) -> Response {
        var r = Reader(bytes: bytes)
        guard bytes.count >= 12 else { throw bad("\(bytes.count)-byte message, shorter than a header") }
        let gotID = try r.u16("id")
        guard gotID == id else { throw bad("id \(gotID), expected \(id)") }
        let flags = try r.u16("flags")
        guard flags & 0x8000 != 0 else { throw bad("not a response (QR clear)") }
        guard (flags >> 11) & 0xF == 0 else { throw bad("opcode \((flags >> 11) & 0xF), expected 0") }
        let qd = try r.u16("qdcount"), an = try r.u16("ancount"), ns = try r.u16("nscount"), ar = try r.u16("arcount")
        guard qd == 1 else { throw bad("\(qd) questions, expected the 1 asked") }
        // Every record is at least 11 bytes: a count the message cannot hold is refused up front.
        guard (Int(an) + Int(ns) + Int(ar)) * 11 <= bytes.count - 12 else {
            throw bad("\(an)+\(ns)+\(ar) records cannot fit in \(bytes.count) bytes")
        }
        let qname = try r.name("question name")
        let qtype = try r.u16("question type"), qclass = try r.u16("question class")
        guard qname == canonical(name), qtype == type, qclass == classIN else {
            throw bad("question \(qname)/\(qtype)/\(qclass) is not the one asked (\(canonical(name))/\(type)/IN)")
        }
        var answers: [Record] = [], additional: [Record] = []
        for i in 0..<Int(an) { answers.append(try r.record("answer \(i)")) }
        for i in 0..<Int(ns) { _ = try r.record("authority \(i)") }
        for i in 0..<Int(ar) {
            let rec = try r.record("additional \(i)")
            if rec.type != typeOPT { additional.append(rec) }
        }
        guard r.offset == bytes.count else { throw bad("\(bytes.count - r.offset) byte(s) after the last record") }
        return Response(rcode: UInt8(flags & 0xF), truncated: flags & 0x0200 != 0, answers: answers, additional: additional)
    }

    static func bad(_ detail: String) -> DiscoveryError { DiscoveryError(.malformed, "DNS answer: " + detail) }

    struct Reader {
        let bytes: [UInt8]
        var offset = 0

        mutating func u8(_ what: String) throws(DiscoveryError) -> UInt8 {
            guard offset < bytes.count else { throw bad("\(what) cut short at byte \(offset)") }
            defer { offset += 1 }
            return bytes[offset]
        }

        mutating func u16(_ what: String) throws(DiscoveryError) -> UInt16 {
            guard offset + 2 <= bytes.count else { throw bad("\(what) cut short at byte \(offset)") }
            defer { offset += 2 }
            return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
        }

        mutating func u32(_ what: String) throws(DiscoveryError) -> UInt32 {
            UInt32(try u16(what)) << 16 | UInt32(try u16(what))
        }

        /// A possibly compressed name, read at `offset`; `offset` moves past its bytes in place.
        mutating func name(_ what: String) throws(DiscoveryError) -> String {
            var labels: [String] = []
            var length = 1
            var at = offset
            var resumeAt: Int?
            // A pointer must go strictly backwards from the label that holds it: names then
            // cannot loop, and there can be no more jumps than bytes before the start.
            var lowest = offset
            while true {
                guard at < bytes.count else { throw bad("\(what) cut short at byte \(at)") }
                let len = bytes[at]
                switch len & 0xC0 {
                case 0xC0:
                    guard at + 1 < bytes.count else { throw bad("\(what): compression pointer cut short") }
                    let target = Int(len & 0x3F) << 8 | Int(bytes[at + 1])
                    guard target < lowest else { throw bad("\(what): compression pointer to \(target) does not point backwards") }
                    if resumeAt == nil { resumeAt = at + 2 }
                    lowest = target
                    at = target
                case 0x00:
                    if len == 0 {
                        offset = resumeAt ?? at + 1
                        return labels.joined(separator: ".")
                    }
                    guard at + 1 + Int(len) <= bytes.count else { throw bad("\(what): label cut short") }
                    length += Int(len) + 1
                    guard length <= 255 else { throw bad("\(what): name longer than 255 bytes") }
                    let raw = bytes[(at + 1)..<(at + 1 + Int(len))]
                    guard raw.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != 0x2E }) else {
                        throw bad("\(what): label with a byte that is not printable ASCII")
                    }
                    labels.append(String(decoding: raw, as: UTF8.self).lowercased())
                    at += 1 + Int(len)
                default:
                    throw bad("\(what): label type 0x\(String(len & 0xC0, radix: 16)) is not supported")
                }
            }
        }

        mutating func record(_ what: String) throws(DiscoveryError) -> Record {
            let owner = try name("\(what) owner")
            let type = try u16("\(what) type"), cls = try u16("\(what) class")
            _ = try u32("\(what) ttl")
            let rdlength = Int(try u16("\(what) length"))
            let start = offset
            guard start + rdlength <= bytes.count else { throw bad("\(what): \(rdlength)-byte data runs past the message") }
            var data = RData.other
            if type != typeOPT && cls == classIN {
                switch type {
                case typeAAAA:
                    guard rdlength == 16 else { throw bad("\(what): AAAA data is \(rdlength) bytes, not 16") }
                    let b = Array(bytes[start..<(start + 16)])
                    data = .aaaa(
                        IPv6Address(
                            bytes: (
                                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                                b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
                            )))
                    offset += 16
                case typeSRV:
                    guard rdlength >= 7 else { throw bad("\(what): SRV data is \(rdlength) bytes, less than 7") }
                    let p = try u16("SRV priority"), w = try u16("SRV weight"), port = try u16("SRV port")
                    let target = try name("\(what) SRV target")
                    data = .srv(priority: p, weight: w, port: port, target: target)
                case typeCNAME:
                    data = .cname(try name("\(what) CNAME target"))
                default:
                    offset += rdlength
                }
            } else {
                offset += rdlength
            }
            guard offset == start + rdlength else { throw bad("\(what): data length \(rdlength) does not match its contents") }
            return Record(owner: owner, type: type, data: data)
        }
    }
}
