// libFuzzer target for what the mesh reads off the network besides advert bodies (those are
// `scripts/fuzz advert`): probe answers (MeshWire.ProbeAnswer), relay paths
// (MeshWire.parseRelay), DNS discovery answers (DNSMessage.parse + the CNAME-following
// DNSDiscovery.answers), etcd member records (MemberRecord.decode) and signed adverts
// (SignedAdvert.verify: body, certificate chain, signature, time; trust accepts all). Not
// part of the package build: `scripts/fuzz mesh` recompiles STOQMesh with coverage.
//
// Input: byte 0 picks the decoder (mod 5); the rest is its bytes. For DNS, the answer's own
// id is taken as the one asked and bit 0 of byte 0 of the rest picks SRV or AAAA, so the
// fuzzer gets past the id check; the question must be "stoq.mesh.svc". For member records the
// key name is what precedes the first NUL.
//
// Properties: a decoded probe answer re-encodes to bytes that decode to itself; a relay path
// has a 64-hex holder, 1...3 digits of hops and a /chunks/ or /manifests/ resource; a member
// record's key matches what it names; every SRV/AAAA answer kept belongs to the CNAME chain.

import STOQCore
@testable import STOQMesh

@_cdecl("LLVMFuzzerTestOneInput")
public func meshFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size >= 1 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    switch data[0] % 5 {
    case 0:
        guard let answer = try? MeshWire.ProbeAnswer(decoding: bytes) else { return 0 }
        guard let back = try? MeshWire.ProbeAnswer(decoding: answer.encoded), back == answer else { fatalError("probe answer round trip") }
    case 1:
        let path = String(decoding: bytes, as: UTF8.self)
        guard let r = MeshWire.parseRelay(path) else { return 0 }
        guard r.holder.utf8.count == 64, r.holder.allSatisfy(\.isHexDigit), r.holder == r.holder.lowercased() else { fatalError("holder \(r.holder)") }
        guard (0...999).contains(r.hops) else { fatalError("hops \(r.hops)") }
        guard ["/chunks/", "/manifests/", "/objects/"].contains(where: { r.resourcePath.hasPrefix($0) }) else { fatalError("resource \(r.resourcePath)") }
        guard MeshWire.handles(path) else { fatalError("a relay path the mesh does not handle") }
    case 2:
        guard bytes.count >= 2 else { return 0 }
        let id = UInt16(bytes[0]) << 8 | UInt16(bytes[1])
        let type = bytes.count > 2 && bytes[2] & 1 == 1 ? DNSMessage.typeAAAA : DNSMessage.typeSRV
        let name = "stoq.mesh.svc"
        guard let response = try? DNSMessage.parse(bytes, id: id, name: name, type: type) else { return 0 }
        for r in DNSDiscovery.answers(response, for: name) {
            guard r.type != DNSMessage.typeCNAME else { fatalError("a CNAME among the answers") }
            if case .aaaa(let a) = r.data { _ = DNSDiscovery.refusal(a) }
        }
    case 3:
        let cut = bytes.firstIndex(of: 0) ?? bytes.count
        let name = String(decoding: bytes[..<cut], as: UTF8.self)
        guard case .success(let member) = MemberRecord.decode(name: name, value: Array(bytes[min(cut + 1, bytes.count)...])) else { return 0 }
        guard name == member.nodeID?.hex ?? member.url.endpoint.description else { fatalError("key mismatch accepted") }
        guard case .success(let back) = MemberRecord.decode(name: name, value: MemberRecord.encode(member)), back == member else {
            fatalError("member record round trip")
        }
    default:
        _ = try? SignedAdvert.verify(bytes, nowMillis: 1_700_000_000_000, trusting: { _ in })
    }
    return 0
}
