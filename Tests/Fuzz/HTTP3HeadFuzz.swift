// libFuzzer target for a received HTTP/3 head as the node reads it (QUICEndpoint's
// on_request/on_response): the packed field buffer the C shim hands over (`stoq_head`),
// copied out by `httpFields`, then `HTTPRequestHead.parse` (pseudo-headers, 400/414/431),
// `HTTPResponseHead.parse` (the client side), and `HTTPRange.resolve` for the `Range` the
// request carried (ObjectService). Not part of the package build: `scripts/fuzz http3`
// recompiles STOQQUIC with coverage and links the rest from the debug build.
//
// Input: byte 0 = has_body (bit 0); bytes 1...4 = section_size (little endian); byte 5 =
// nfields; the rest is the packed buffer exactly as stoq_h3.c lays it out (stoq_field_hdr,
// name, kept value; repeated). The buffer is not trusted: nfields and the lengths may lie.
//
// Properties: a refusal carries 400, 414 or 431 and matches the flags; an accepted request has
// a method and path within the limits; a resolved range lies inside the object.

import CNgtcp2
@testable import STOQQUIC

@_cdecl("LLVMFuzzerTestOneInput")
public func http3HeadFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size >= 6 else { return 0 }
    let section = UInt64(data[1]) | UInt64(data[2]) << 8 | UInt64(data[3]) << 16 | UInt64(data[4]) << 24
    let head = stoq_head(
        fields: data + 6, fields_len: size - 6, nfields: Int(data[5]), dropped: 0,
        section_size: section, has_body: Int32(data[0] & 1))
    let fields = head.httpFields
    guard fields.count <= Int(data[5]) else { fatalError("more fields than nfields") }
    let request = HTTPRequestHead.parse(fields, sectionSize: Int(clamping: head.section_size), hasBody: head.has_body != 0)
    if let refusal = request.refusal {
        guard [400, 414, 431].contains(refusal.status) else { fatalError("refusal status \(refusal.status)") }
        guard request.malformed || request.pathTooLong || request.headersTooLarge else { fatalError("refusal without a cause flag") }
    } else {
        guard !request.malformed, !request.pathTooLong, !request.headersTooLarge else { fatalError("flag without a refusal") }
        guard request.method.utf8.count <= HTTPRequestHead.maxMethodLength else { fatalError("method too long accepted") }
        guard request.path.utf8.count <= HTTPRequestHead.maxPathLength else { fatalError("path too long accepted") }
    }
    guard request.authority.utf8.count <= HTTPRequestHead.maxAuthorityLength else { fatalError("authority not cut") }
    if let n = request.contentLength, n < 0 { fatalError("negative content-length") }
    for objectSize: UInt64 in [0, 1, 1000, .max] {
        if case .success(let r)? = HTTPRange.resolve(request.range, size: objectSize) {
            guard r.upperBound < objectSize else { fatalError("range \(r) outside \(objectSize) bytes") }
        }
    }
    let response = HTTPResponseHead.parse(fields)
    if let n = response.contentLength, n < 0 { fatalError("negative response content-length") }
    if let n = response.maxAge, n < 0 { fatalError("negative max-age") }
    return 0
}
