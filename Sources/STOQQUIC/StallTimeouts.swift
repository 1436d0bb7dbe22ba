import CNgtcp2
import STOQCore

/// What a server says of a stalled stream (slowloris: a client that begins a request head, or
/// sends part of a request body, and stops, or stops granting flow control to a response, while
/// keeping its connection alive). The endpoint finds them (`STOQ_HEAD_TIMEOUT`,
/// `QUICSettings.bodyTimeout`, `sendTimeout`; the C shim's `stoq_endpoint_ctx_sweep`), answers
/// or resets them, and counts them (`EndpointCounters.requestsTimedOutHead`,
/// `requestsTimedOutBody`, `requestsTimedOutSend`); these are its words, in the 408's body and
/// the node's log, named after the settings an operator would change.
///
/// Why "no byte acknowledged" for a response: in QUIC a peer that stops reading stops granting
/// MAX_STREAM_DATA, and the sender then has nothing to send and so nothing acknowledged; a peer
/// that stops acknowledging is the same stall seen earlier. An acknowledgement is what lets the
/// sender release the body it holds, so it is the progress that frees what a stall holds.
/// The stream offset advancing would also count bytes sent into the window and never taken.
/// A response waiting its turn behind its connection's others (nghttp3 sends responses of one
/// urgency one after another) has credit and a connection that moves: it is not stalled.
public enum StallTimeouts {
    /// How long a request head may take (ns), a fixed limit: one not complete this long after
    /// its HEADERS frame began is refused, its stream reset (`STOQ_HEAD_TIMEOUT`, the shim's).
    public static let headTimeout: UInt64 = STOQ_HEAD_TIMEOUT

    /// A refused head, for the log: `request head not complete 10 s after it began (a fixed
    /// limit); the stream reset (H3_REQUEST_REJECTED)`.
    public static func headStalled(timeout: UInt64) -> String {
        "request head not complete \(duration(timeout)) after it began (a fixed limit); the stream reset (H3_REQUEST_REJECTED)"
    }

    /// The 408's text: e.g. `no request body bytes for 60 s (limits.body_timeout); 12345 of
    /// 1048576 bytes received`.
    public static func bodyStalled(timeout: UInt64, received: UInt64, expected: UInt64?) -> String {
        let of = expected.map { "\(received) of \($0) bytes received" } ?? "\(received) bytes received"
        return "no request body bytes for \(duration(timeout)) (limits.body_timeout); \(of)"
    }

    /// A reset response, for the log: e.g. `no response body bytes acknowledged for 60 s
    /// (limits.send_timeout); 65536 of 8388608 bytes acknowledged`.
    public static func sendStalled(timeout: UInt64, acknowledged: UInt64, given: UInt64) -> String {
        "no response body bytes acknowledged for \(duration(timeout)) (limits.send_timeout); \(acknowledged) of \(given) bytes acknowledged"
    }

    /// A response reset for going too slowly, for the log: e.g. `response body acknowledged at
    /// under 1000 bytes/s over 60 s while the client held it (limits.min_send_rate); 65536 of
    /// 8388608 bytes acknowledged`.
    public static func sendTooSlow(window: UInt64, minRate: UInt64, acknowledged: UInt64, given: UInt64) -> String {
        "response body acknowledged at under \(minRate) bytes/s over \(duration(window)) while the client held it (limits.min_send_rate); \(acknowledged) of \(given) bytes acknowledged"
    }

    /// `ns` as the operator wrote it, near enough: whole seconds as `60 s`, the rest in ms.
    public static func duration(_ ns: UInt64) -> String {
        ns % Nanos.second == 0 ? "\(ns / Nanos.second) s" : "\(ns / 1_000_000) ms"
    }
}
