/// How a STOQ node tags an object whose content digest it knows: a strong `ETag` that is its
/// SHA-256 in lower-case hex, quoted. Chunked objects, digested plain files and flat uploads
/// are tagged this way wherever a node serves them; clients and edges check a body against it.
public enum ContentETag {
    /// The ETag of content whose SHA-256 is `sha256Hex` (64 lower-case hex digits).
    public static func of(sha256Hex: String) -> String { "\"" + sha256Hex + "\"" }

    /// The SHA-256 that `etag` names (lower-case hex), or nil when it names none: a weak tag,
    /// another kind of tag, or anything but 64 hex digits between the quotes (either case).
    public static func sha256(in etag: String) -> String? {
        guard etag.count == 66, etag.hasPrefix("\""), etag.hasSuffix("\""), let bytes = Hex.decode(etag.dropFirst().dropLast()), bytes.count == 32
        else { return nil }
        return Hex.encode(bytes)
    }
}
