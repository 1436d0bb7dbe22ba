import STOQCore

// Apart from Manifest.swift, which the manifest fuzz target compiles on its own, without modules.
extension Manifest {
    /// The object's ETag wherever a STOQ node serves it (`ContentETag`).
    public var etag: String { ContentETag.of(sha256Hex: digest.hex) }
}
