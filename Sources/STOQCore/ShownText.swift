/// Text someone else chose (a request's path, a token's claim), as a log line or an error
/// message shows it: those are the node's, and a client's string may be of any length.
public enum ShownText {
    /// How many characters of such text a line shows, before `…` and its whole length.
    public static let length = 64

    /// `text` as a line shows it: whole up to `length` characters; past that its first
    /// `length`, then `… (<n> bytes)`.
    public static func cut(_ text: some StringProtocol) -> String {
        let scalars = text.unicodeScalars
        guard scalars.count > length else { return String(text) }
        return String(String.UnicodeScalarView(scalars.prefix(length))) + "… (\(text.utf8.count) bytes)"
    }
}
