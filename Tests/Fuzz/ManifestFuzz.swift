// libFuzzer target for the manifest decoder. Not part of the package build: scripts/fuzz manifest
// compiles it with `swiftc -sanitize=fuzzer,address` together with the three STOQChunking files
// that have no imports (Manifest, ContentDigest, ChunkingParameters), so no package product is needed.
//
// Property checked: any input either throws a ManifestError or decodes to a manifest whose
// encoding is exactly the input, and which decodes back to itself.

@_cdecl("LLVMFuzzerTestOneInput")
public func manifestFuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    guard let m = try? Manifest(decoding: bytes) else { return 0 }
    let again = m.encode()
    guard again.count == size, again.elementsEqual(bytes) else { fatalError("re-encoding differs from the input") }
    guard let back = try? Manifest(decoding: again), back == m else { fatalError("re-decoding differs") }
    return 0
}
