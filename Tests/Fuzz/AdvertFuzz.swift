// libFuzzer target for the link-state advert body decoder. Not part of the package build:
// scripts/fuzz advert compiles it with `swiftc -sanitize=fuzzer,address` together with
// Sources/STOQMesh/AdvertBody.swift, which has no imports.
//
// Property checked: any input either throws an AdvertError or decodes to an advert whose
// encoding is exactly the bytes it took, and which decodes back to itself.

@_cdecl("LLVMFuzzerTestOneInput")
public func advertFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    guard let (advert, used) = try? AdvertBody.decodeBody(bytes[...]) else { return 0 }
    let again = advert.encodeBody()
    guard again.count == used, again.elementsEqual(bytes[..<used]) else { fatalError("re-encoding differs from the input") }
    guard let (back, _) = try? AdvertBody.decodeBody(again[...]), back == advert else { fatalError("re-decoding differs") }
    return 0
}
