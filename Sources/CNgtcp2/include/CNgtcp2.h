/*
 * CNgtcp2: the one place STOQ touches ngtcp2 0.12, ngtcp2_crypto_gnutls, GnuTLS
 * and nghttp3.
 *
 * Why a shim: the libraries' headers are large, versioned through macros and full
 * of callbacks; Swift sees only this small, stable, sans-IO surface. A connection
 * here is QUIC + TLS + HTTP/3 together. It never opens a socket, reads a clock or
 * starts a thread: callers pass datagrams and `now` (nanoseconds, monotonic) in,
 * and get packets written into buffers they own. Bodies are zero-copy: a response
 * body is a caller-owned memory region (an mmap of the object), and received bodies
 * go to a file descriptor through a writer thread (stoq_sink.c), so the per-packet path
 * allocates nothing and never waits for a disk.
 *
 * What a head means is not decided here: the shim keeps a head's fields in a bounded
 * per-stream buffer and hands them to Swift once, at the end of the head (stoq_head), where
 * STOQQUIC's HTTPRequestHead applies the HTTP rules. Files: stoq_conn.c (lifecycle, ngtcp2
 * callbacks), stoq_io.c (packets in and out), stoq_h3.c (nghttp3), stoq_sink.c (received
 * bodies), stoq_pkt.c (stateless packets), stoq_tls.c (credentials, verify callbacks),
 * stoq_qlog.c (sampled qlog files).
 */
#ifndef CNGTCP2_H
#define CNGTCP2_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <netinet/in.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The largest connection ID QUIC allows. */
#define STOQ_MAX_CIDLEN 20
/** The length of the connection IDs STOQ issues; byte 0 is the worker id. */
#define STOQ_SCIDLEN 16
/** Bytes of a static secret (tokens, stateless reset). */
#define STOQ_SECRETLEN 32
/** Room for what the certificate policy says an accepted peer is (`stoq_conn_peer_identity`),
 *  with its NUL: a client's roles, key id and subject; a server's node id. 256 before the key
 *  id, whose 64 hex digits and separator take nothing from the subject's room. */
#define STOQ_PEER_IDENTITY_MAX (256 + 65)
/** Longest request target STOQ accepts; longer gets 414 (the rule is HTTPRequestHead's). */
#define STOQ_MAX_PATH 4096
/** Largest request field section (RFC 9114 §4.2.2 size) STOQ serves; larger gets 431 (ditto). */
#define STOQ_MAX_FIELD_SECTION 16384
/** Most header fields a response or request STOQ sends carries besides its own (pseudo-headers,
 *  server, user-agent): a section of more is larger than STOQ_MAX_FIELD_SECTION (RFC 9114
 *  §4.2.2 counts each field at least 32 bytes), which STOQ itself refuses. More are refused
 *  whole, never dropped. */
#define STOQ_MAX_HEADERS (STOQ_MAX_FIELD_SECTION / 32)

/* ---- TLS credentials ------------------------------------------------------ */

/** GnuTLS certificate credentials for one role; immutable once made, shared by workers. */
typedef struct stoq_tls_ctx stoq_tls_ctx;

/** Loads a PEM certificate chain and key for serving. NULL with `err` filled on failure. */
stoq_tls_ctx *stoq_tls_server_new(const char *cert_file, const char *key_file, char *err, size_t errlen);
/** Client credentials. Unless `insecure`, a policy (`stoq_tls_set_peer_check`) must judge the
 *  server's certificate; without one every server is refused. */
stoq_tls_ctx *stoq_tls_client_new(int insecure, char *err, size_t errlen);
/** Frees credentials. Only once no connection uses them. */
void stoq_tls_free(stoq_tls_ctx *ctx);

/** Client authentication a server asks for (mutual TLS). */
enum { STOQ_CLIENT_AUTH_NONE = 0, STOQ_CLIENT_AUTH_OPTIONAL = 1, STOQ_CLIENT_AUTH_REQUIRED = 2 };

/** Server: ask clients for a certificate (`mode`). The policy registered with
 *  `stoq_tls_set_peer_check` judges it; a refused peer fails the handshake and the
 *  connection's error string says why. */
void stoq_tls_server_set_client_auth(stoq_tls_ctx *t, int mode);

/** The certificate policy, run inside the TLS verify callback on the worker's thread, once per
 *  handshake. `certs[i]` (`lens[i]` bytes, DER) is the chain the peer sent, leaf first, `n` of
 *  them; `server_name` is what the client dialled (DNS name or IPv6 literal) when judging a
 *  server, NULL when judging a client. Returns 0 to accept, else writes the reason to `why`
 *  (NUL-terminated) and returns nonzero. On accepting a client it may write the client's
 *  identity to `why` instead (the access policy's roles, key id and subject), which the
 *  connection keeps (`stoq_conn_peer_identity`, at most STOQ_PEER_IDENTITY_MAX - 1 bytes).
 *  STOQ's is Swift's PeerVerifier: C judges nothing. */
typedef int (*stoq_peer_check_fn)(void *ctx, const uint8_t *const *certs, const size_t *lens, size_t n,
                                  const char *server_name, char *why, size_t why_len);

/** Registers the policy `fn` (with `ctx`, which must outlive the credentials): on server
 *  credentials with client authentication, or on client credentials. */
void stoq_tls_set_peer_check(stoq_tls_ctx *t, stoq_peer_check_fn fn, void *ctx);

/** Client: present this certificate chain and key when a server asks (mutual TLS). 0 or -1 (err). */
int stoq_tls_client_set_certificate(stoq_tls_ctx *t, const char *cert_file, const char *key_file, char *err,
                                    size_t errlen);

/** The TLS 1.3 cipher suites QUIC may use, the shim's one table (RFC 9001 §5.3), in the order
 *  a default endpoint offers them: how many, and suite `i`'s GnuTLS name (AES-128-GCM ...) or,
 *  with `iana`, its IANA one (TLS_AES_128_GCM_SHA256 ...); NULL past the end. Names are
 *  parsed in Swift (`TLSCredentials`). */
size_t stoq_tls_cipher_suite_count(void);
const char *stoq_tls_cipher_suite_name(size_t i, int iana);

/** The version of library `i` this process runs (not the headers it was built with), its name
 *  in `*name`: 0 ngtcp2, 1 nghttp3, 2 GnuTLS; NULL past the end. */
const char *stoq_library_version(size_t i, const char **name);

/** Offer (client) or accept (server) only the suites `suites` (n distinct indices into that
 *  table), in this order. Before the credentials serve a connection. 0, or -1 (err). */
int stoq_tls_set_cipher_suites(stoq_tls_ctx *t, const uint8_t *suites, size_t n, char *err, size_t errlen);

/* ---- Endpoint configuration ----------------------------------------------- */

typedef struct stoq_conn stoq_conn;
typedef struct stoq_stream stoq_stream;

/** Bytes of one head's fields a stream keeps: the largest field section a request may have
 *  plus the longest path (what nghttp3 is told to accept). A larger head is counted, not kept.
 *  The buffer grows to this as the fields come (it starts at 1 KB, when the first one does). */
#define STOQ_HEAD_BUFFER (STOQ_MAX_FIELD_SECTION + STOQ_MAX_PATH)
/** Head buffer bytes a connection's heads in progress (begun, not yet handed over) hold at most:
 *  four heads as large as STOQ_HEAD_BUFFER. A head that would take more is refused: its stream
 *  is reset with H3_EXCESSIVE_LOAD. (A head arriving whole in one read holds its buffer for that
 *  read only; QPACK references let a few bytes on the wire stand for a large head.) */
#define STOQ_HEAD_BYTES_MAX (4 * STOQ_HEAD_BUFFER)
/** How long a server gives a request head (ns): one not complete this long after its HEADERS
 *  frame began (the frame stops, or waits for QPACK instructions that do not come) is refused
 *  by the sweep (stoq_endpoint_ctx_sweep, STOQ_STALL_HEAD). */
#define STOQ_HEAD_TIMEOUT (10ull * 1000000000ull)

/** One field of a received head, packed: this, then `name_len` bytes of name, then
 *  `value_kept` bytes of value (`value_len` is its length on the wire; it was cut when the
 *  buffer ran out). Unaligned: copy it out. */
typedef struct stoq_field_hdr {
  uint32_t name_len, value_len, value_kept;
} stoq_field_hdr;

/** A received head (request or response) exactly as it came: the shim applies no HTTP rule;
 *  the application parses it (STOQQUIC's HTTPRequestHead). Valid during the callback only. */
typedef struct stoq_head {
  const uint8_t *fields; /* `nfields` packed fields in the order received */
  size_t fields_len, nfields;
  size_t dropped;        /* fields that did not fit at all (counted in section_size only) */
  uint64_t section_size; /* RFC 9114 §4.2.2 size of the whole section: name + value + 32 each */
  int has_body;          /* the stream did not end with the head */
} stoq_head;

/** Application events. Each gets `ctx` back. Called on the connection's worker thread only. */
typedef struct stoq_events {
  void *ctx;
  /** Server: a request head is complete (once per request). Respond now or later with stoq_stream_respond. */
  void (*on_request)(void *ctx, stoq_conn *c, stoq_stream *s, const stoq_head *head);
  /** Server: the request body (if any) ended, once per request; `aborted` when the peer reset
   *  it before its end (what was queued for the sink has been written; nothing more comes). */
  void (*on_request_end)(void *ctx, stoq_conn *c, stoq_stream *s, int aborted);
  /** Client: a response head arrived (once per response). */
  void (*on_response)(void *ctx, stoq_conn *c, stoq_stream *s, const stoq_head *head);
  /** Both: the stream is gone; the handle is invalid after this returns. */
  void (*on_stream_close)(void *ctx, stoq_conn *c, stoq_stream *s, uint64_t app_error_code);
  /** Both: a connection ID of ours was added (`added`=1) or retired (0): keep the endpoint's table in step. */
  void (*on_cid)(void *ctx, stoq_conn *c, const uint8_t *cid, size_t cidlen, int added);
  /** Both: the handshake completed. */
  void (*on_handshake)(void *ctx, stoq_conn *c);
  /** Both: a streamed body (a server's stoq_stream_respond_streamed, a client's request with
   *  STOQ_BODY_STREAMED) has sent everything it was given and has room for more: append the
   *  next piece with stoq_stream_body_append. */
  void (*on_body_wanted)(void *ctx, stoq_conn *c, stoq_stream *s);
  /** Both: received body the connection's streams had queued for writing landed, and its flow
   *  control credit went back to the peer: write the connection (MAX_STREAM_DATA is owed). */
  void (*on_sink_progress)(void *ctx, stoq_conn *c);
  /** Server: the request body reached the mark set with stoq_stream_set_body_mark (once). */
  void (*on_body_mark)(void *ctx, stoq_conn *c, stoq_stream *s);
  /** Server, from stoq_endpoint_ctx_sweep: the stream made no progress for its timeout
   *  (`what`: STOQ_STALL_HEAD, STOQ_STALL_BODY or STOQ_STALL_SEND). It no longer is watched;
   *  see the sweep. A head's stream is one the application never heard of. */
  void (*on_stalled)(void *ctx, stoq_conn *c, stoq_stream *s, int what);
} stoq_events;

/** Transport settings shared by an endpoint's connections. */
typedef struct stoq_settings {
  uint8_t cc_algo;            /* 0 reno, 1 cubic, 2 bbr, 3 bbr2 */
  uint8_t worker_id;          /* first byte of every CID this endpoint issues */
  int log;                    /* ngtcp2 debug log to stderr */
  uint64_t idle_timeout;      /* ns */
  uint64_t handshake_timeout; /* ns */
  /* ns, client: a PING after this long without traffic (0: never). It keeps an idle connection
     past the peer's idle timeout, and a client that only receives sends nothing once cut off (a
     NAT that forgot its mapping, an address that went): the PING gets a new mapping made, or a
     failed send noticed. */
  uint64_t keep_alive;
  uint64_t initial_max_data;
  uint64_t initial_max_stream_data;
  uint64_t max_window;
  uint64_t max_stream_window;
  uint64_t max_streams_bidi;
  size_t max_udp_payload_size;
  size_t ack_thresh;
  /* server: issue TLS 1.3 session tickets good for this many seconds (1 … 604800; 0: none).
     Tickets are sealed under one key per process (stoq_tls.c), so any worker resumes them;
     GnuTLS derives a fresh sealing key from it every `ticket_lifetime` and still opens
     tickets sealed under the previous one. */
  uint32_t ticket_lifetime;
  /* server, with tickets: accept 0-RTT (early data) from resuming clients. Each ClientHello
     carrying early data is accepted once within GnuTLS's 10 s anti-replay window, node-wide,
     and each /64 at most STOQ_ANTI_REPLAY_PER_PREFIX of them in it (stoq_tls.c); what the
     early requests may do is the application's rule (GET/HEAD only, RFC 8470).
     client: offer 0-RTT when resuming a session; requests go in it once the server's
     parameters are given (stoq_conn_set_early_params). */
  int early_data;
  /* server: the address sent as the preferred_address transport parameter (RFC 9000 §9.6),
     with its own CID (worker byte as any other) and stateless reset token; clients move there
     once the handshake is confirmed. sin6_family 0: none. The node must receive on it. */
  struct sockaddr_in6 preferred_address;
  uint8_t static_secret[STOQ_SECRETLEN];
} stoq_settings;

/** An endpoint's immutable context: role, credentials, settings, events. */
typedef struct stoq_endpoint_ctx stoq_endpoint_ctx;

/** Makes a context. `tls` must outlive it. `is_server` picks the role. */
stoq_endpoint_ctx *stoq_endpoint_ctx_new(int is_server, stoq_tls_ctx *tls, const stoq_settings *settings,
                                         const stoq_events *events);
/** Swaps the credentials new handshakes use (rotation); existing connections keep theirs. */
void stoq_endpoint_ctx_set_tls(stoq_endpoint_ctx *ep, stoq_tls_ctx *tls);
void stoq_endpoint_ctx_free(stoq_endpoint_ctx *ep);

/* ---- Body writer (stoq_sink.c) ------------------------------------------------- */

/** What an endpoint's body writer did: received bodies that go to a file are queued in 256 KB
 *  buffers to one writer thread per endpoint, off the loop. */
typedef struct stoq_sink_stats {
  uint64_t jobs;              /* buffers queued to the writer */
  uint64_t bytes_written;     /* bytes the writer wrote (failed writes not counted) */
  uint64_t bytes_queued;      /* received, not yet written (staged or queued) */
  uint64_t jobs_pending;      /* buffers queued whose results the loop has not taken yet */
  uint64_t peak_bytes_queued; /* the most that ever was: at most ring_bytes */
  uint64_t waits;             /* the loop waited for a free buffer (several streams filled the ring) */
  uint64_t drain_waits;       /* a closing stream waited for its queued writes */
  uint64_t inline_writes;     /* bytes written on the loop (no buffer could be had) */
  uint64_t buffers;           /* buffers allocated so far (reused; at most ring_bytes / 256 KB) */
  uint64_t ring_bytes;        /* the most received body held: one stream window */
} stoq_sink_stats;
void stoq_endpoint_ctx_sink_stats(const stoq_endpoint_ctx *ep, stoq_sink_stats *out);

/** Takes the writer's finished work: errors to their streams, flow control credit back to the
 *  peers (on_sink_progress), request ends that waited for their writes (on_request_end). Call
 *  on the endpoint's thread every turn of its loop. Returns the buffers taken back. */
int stoq_endpoint_ctx_sink_poll(stoq_endpoint_ctx *ep);
/** Stalled streams (slowloris). A server endpoint watches, without allocating, the streams
 *  receiving a request head or body and the streams holding response body bytes the peer has
 *  not acknowledged, and notes when each began its head or last moved (a body byte arrived, or
 *  was acknowledged) by the endpoint's clock: the `now` of the last read, write, expiry or
 *  stoq_endpoint_ctx_clock.
 *
 *  The sweep reports, through on_stalled, each watched stream that has not moved for its
 *  timeout (0: bodies or responses are not swept), once, and stops watching it:
 *  - STOQ_STALL_HEAD: the request head was not complete STOQ_HEAD_TIMEOUT after it began
 *    (always swept). The application never saw the request: the stream is reset with
 *    H3_REQUEST_REJECTED (RFC 9114 §8.1: not processed) and nothing more of it is read.
 *  - STOQ_STALL_BODY: no request body byte arrived for `body_timeout` (a stream whose writes
 *    are still queued is not stalled: its credit is held by the disk, not the peer). Before
 *    the call, the queued writes have landed, the rest of the body is dropped, and the peer
 *    was asked to stop sending it (STOP_SENDING, H3_NO_ERROR: RFC 9114 §4.1 lets a server
 *    that answers a request in full stop reading it).
 *  - STOQ_STALL_SEND: no byte of the response body was acknowledged for `send_timeout`, while
 *    the peer gives the stream no credit, or acknowledges nothing of the
 *    connection's responses: a response waiting its turn behind the connection's others, with
 *    credit, is not stalled while those move.
 *  - STOQ_STALL_SLOW: the response body was acknowledged at under `min_send_rate` bytes a
 *    second (0: never checked) over a window of `send_timeout` (its first begins when there is
 *    something to send, the next when one is passed), while the peer held it as for
 *    STOQ_STALL_SEND: a client that grants a few bytes of credit each time it must, to dodge
 *    `send_timeout`, holds the response no longer than one that grants none.
 *  Returns how many were reported. */
int stoq_endpoint_ctx_sweep(stoq_endpoint_ctx *ep, uint64_t now, uint64_t body_timeout, uint64_t send_timeout,
                            uint64_t min_send_rate);
/** Sets the endpoint's clock (one store): call before stoq_endpoint_ctx_sink_poll. */
void stoq_endpoint_ctx_clock(stoq_endpoint_ctx *ep, uint64_t now);
/** Whether any stream is watched (a sweep has something to look at). */
int stoq_endpoint_ctx_watching(const stoq_endpoint_ctx *ep);
#define STOQ_STALL_BODY 1
#define STOQ_STALL_SEND 2
#define STOQ_STALL_HEAD 3
#define STOQ_STALL_SLOW 4

/** The eventfd the writer signals after each buffer it writes (the endpoint's own, unless set
 *  with stoq_endpoint_ctx_set_sink_wake_fd): the loop waits on it with its datagrams, so that
 *  credit goes back while the peer is stopped by flow control. -1 if there is no writer. */
int stoq_endpoint_ctx_sink_wake_fd(const stoq_endpoint_ctx *ep);
/** Signals `fd` instead (an eventfd the loop already waits on); -1: the endpoint's own again. */
void stoq_endpoint_ctx_set_sink_wake_fd(stoq_endpoint_ctx *ep, int fd);

/* ---- qlog (stoq_qlog.c) ------------------------------------------------------ */

/** Connections made from now on write a qlog (ngtcp2's own, JSON-SEQ) to
 *  `dir/<odcid-hex>.<server|client>.sqlog` with probability `sample` (0 … 1; each connection
 *  is drawn once, when it is made), while fewer than `max_open` logged ones are open: a bound
 *  on memory (68 KB each) and on the descriptors qlog takes from the rest of the process.
 *  NULL or "" dir, or `sample` 0: off. Existing connections keep what they had. Returns 0, or
 *  the errno that makes `dir` unusable (it must exist and be writable). Call on the endpoint's
 *  thread. */
int stoq_endpoint_ctx_set_qlog(stoq_endpoint_ctx *ep, const char *dir, double sample, unsigned max_open);

/** What an endpoint's qlog did. */
typedef struct stoq_qlog_stats {
  uint64_t connections; /* connections sampled (a file opened) */
  uint64_t bytes;       /* bytes written to qlog files */
  uint64_t errors;      /* files that could not be opened or written (their qlog stops there) */
  uint64_t skipped;     /* sampled, but max_open logged connections were already open */
} stoq_qlog_stats;
void stoq_endpoint_ctx_qlog_stats(const stoq_endpoint_ctx *ep, stoq_qlog_stats *out);

/** Memory that ngtcp2 and nghttp3 hold for an endpoint's connections now: every block they take
 *  goes through the shim's allocators (stoq_mem.c), which count what each holds (malloc's usable
 *  size, or a large block's whole pages). */
typedef struct stoq_mem_stats {
  uint64_t ngtcp2_bytes;
  uint64_t nghttp3_bytes;
  uint64_t pages_warm_bytes; /* freed large blocks kept resident for reuse */
  uint64_t pages_released;   /* freed large blocks whose pages went back to the kernel, so far */
  uint64_t pages_cold_runs;  /* runs of given-back pages waiting for reuse */
  uint64_t pages_cold_bytes; /* the pages in them */
} stoq_mem_stats;
void stoq_endpoint_ctx_mem_stats(const stoq_endpoint_ctx *ep, stoq_mem_stats *out);
/** Gives the pages of the libraries' freed large blocks back to the kernel: the warm ones kept
 *  for reuse too (stoq_mem.c). For a wave of closes, as malloc_trim is for malloc's heap. */
void stoq_endpoint_ctx_release_memory(stoq_endpoint_ctx *ep);

/* ---- 0-RTT anti-replay (stoq_tls.c) ------------------------------------------- */

/* The ClientHellos with early data one process remembers at once (each for GnuTLS's 10 s
   window plus a second), and the most of them one /64 (the source's first 64 bits) may hold:
   past its share a source's ClientHellos get no 0-RTT (1-RTT instead), and others' still do. */
#define STOQ_ANTI_REPLAY_SLOTS 16384
#define STOQ_ANTI_REPLAY_PER_PREFIX 256

/** What the table said of one ClientHello: only NEW gets 0-RTT. */
enum {
  STOQ_ANTI_REPLAY_NEW = 0,        /* not seen in the window: remembered, early data accepted */
  STOQ_ANTI_REPLAY_SEEN = 1,       /* seen in the window, from any address: a replay */
  STOQ_ANTI_REPLAY_OVER_SHARE = 2, /* its /64 holds STOQ_ANTI_REPLAY_PER_PREFIX live entries */
  STOQ_ANTI_REPLAY_FULL = 3,       /* all STOQ_ANTI_REPLAY_SLOTS entries are live */
};
/** The process's table, since start: its verdicts by kind, and its live entries now. */
typedef struct stoq_anti_replay_stats {
  uint64_t accepted, replays, over_share, full;
  uint64_t live;
} stoq_anti_replay_stats;
void stoq_anti_replay_stats_get(stoq_anti_replay_stats *out);
/** Puts one ClientHello identity from `source` (16 network-order bytes) to the table, as a
 *  handshake with early data does: what a test fills it with. Returns STOQ_ANTI_REPLAY_*. */
int stoq_anti_replay_record(const uint8_t source[16], const uint8_t *id, size_t len);

/* ---- Stateless packet handling -------------------------------------------- */

/** What the header of a received datagram says. */
typedef struct stoq_pkt_ids {
  uint32_t version;
  int is_long;
  size_t dcidlen, scidlen;
  uint8_t dcid[STOQ_MAX_CIDLEN];
  uint8_t scid[255];
} stoq_pkt_ids;

enum {
  STOQ_PKT_OK = 0,
  STOQ_PKT_VERSION_NEGOTIATION = 1, /* unknown version: answer with Version Negotiation */
  STOQ_PKT_INVALID = -1,            /* not a QUIC packet we can route: drop and count */
};

/** Reads version and connection IDs (short headers: `short_dcidlen` bytes of DCID). */
int stoq_pkt_decode_ids(const uint8_t *pkt, size_t len, size_t short_dcidlen, stoq_pkt_ids *out);
/** Whether `pkt` is what the datapath's filter may shed under an Initial flood: a v1 Initial
 *  without a token (the rule and its offsets: bpf/stoq_kern_user.h). */
int stoq_pkt_sheddable_initial(const uint8_t *pkt, size_t len);
/** Writes a Version Negotiation packet answering `ids`. Returns its length or <0. */
ssize_t stoq_pkt_write_version_negotiation(uint8_t *buf, size_t cap, const stoq_pkt_ids *ids);
/** Writes a Stateless Reset for a packet of `received_len` bytes to `dcid`. Returns its length, 0 if the packet was too small to answer, or <0. */
ssize_t stoq_pkt_write_stateless_reset(const stoq_endpoint_ctx *ep, uint8_t *buf, size_t cap, const uint8_t *dcid,
                                       size_t dcidlen, size_t received_len);
/** Answers a client's first Initial `pkt` with a stateless Initial CONNECTION_CLOSE carrying
 *  CONNECTION_REFUSED and `reason` (no state kept; at most three times `len`, RFC 9000 §8.1).
 *  Returns its length, 0 when `pkt` is not an Initial that can be answered, or <0. */
ssize_t stoq_pkt_write_refusal(uint8_t *buf, size_t cap, const uint8_t *pkt, size_t len, const char *reason,
                               size_t reasonlen);

/* ---- Connections ----------------------------------------------------------- */

enum {
  STOQ_ACCEPT_OK = 0,
  STOQ_ACCEPT_DROP = 1,          /* not an acceptable Initial: drop and count */
  STOQ_ACCEPT_RETRY = 2,         /* `out` holds a Retry to send back */
  STOQ_ACCEPT_INVALID_TOKEN = 3, /* `out` holds a stateless CONNECTION_CLOSE (INVALID_TOKEN) */
  STOQ_ACCEPT_UNANSWERED = 4,    /* it wants a stateless reply, but the caller allowed none */
};

/** Server: accepts a client's first Initial. Returns the connection (the caller then feeds it the
 *  same packet with stoq_conn_read), or NULL with `*action` saying what to do. With `retry`,
 *  an Initial without a valid Retry token is answered with a Retry (the
 *  caller decides when: always, or under a flood of half-open connections). Without
 *  `may_reply`, an Initial that would be answered statelessly (a Retry, or INVALID_TOKEN for a
 *  bad token) is dropped before any of that work (STOQ_ACCEPT_UNANSWERED). Announces the
 *  client's original DCID and our first SCID through on_cid; `app` is set before that. */
stoq_conn *stoq_conn_accept(stoq_endpoint_ctx *ep, const uint8_t *pkt, size_t len, const struct sockaddr_in6 *local,
                            const struct sockaddr_in6 *remote, uint64_t now, void *app, int retry, int may_reply,
                            uint8_t *out, size_t outcap, ssize_t *outlen, int *action);

/** Client: starts a connection to `remote`; `server_name` is verified against the certificate
 *  (an IPv6 literal is checked against IP SANs, and is not sent as SNI). */
stoq_conn *stoq_conn_connect(stoq_endpoint_ctx *ep, const char *server_name, const struct sockaddr_in6 *local,
                             const struct sockaddr_in6 *remote, uint64_t now, void *app, char *err, size_t errlen);

/** Ends every stream the connection still has (on_stream_close with H3_REQUEST_CANCELLED, then
 *  its body released): the endpoint does this when it lets a connection go, while the
 *  application may still use the connection in the callback. */
void stoq_conn_end_streams(stoq_conn *c);
/** Frees a connection (and every stream still open, as stoq_conn_end_streams does); its qlog,
 *  if any, is finished. */
void stoq_conn_free(stoq_conn *c);
/** Writes out and closes the connection's qlog, if it has one (the endpoint is done with it:
 *  the file descriptor and buffer go now, not when an application lets go of the handle). */
void stoq_conn_qlog_close(stoq_conn *c);

enum {
  STOQ_CONN_OK = 0,
  STOQ_CONN_CLOSE = -1,    /* fatal: write a CONNECTION_CLOSE with stoq_conn_write_close, then drop */
  STOQ_CONN_DRAINING = -2, /* the peer closed: keep quiet until the drain deadline, then drop */
  STOQ_CONN_DROP = -3,     /* drop now, silently (idle timeout, handshake timeout, hopeless) */
};

/** Feeds one received datagram. */
int stoq_conn_read(stoq_conn *c, const uint8_t *pkt, size_t len, uint8_t ecn, const struct sockaddr_in6 *local,
                   const struct sockaddr_in6 *remote, uint64_t now);

/** Writes as many packets as congestion, pacing and `max_pkts` allow into `buf` as one run:
 *  equal-size datagrams of `*segment_size` bytes, the last may be shorter. With `stride` 0 they
 *  are packed back to back (a GSO buffer); otherwise datagram i starts at buf + i * stride (one
 *  AF_XDP frame each). Returns the run's length — the offset of the last datagram's end — (0:
 *  nothing to send now) or a STOQ_CONN_* error. `*remote` is where to send them and `*local` the
 *  path's local address they must leave from (a node bound to [::] answers from the address the
 *  peer wrote to, or the peer drops the reply). */
ssize_t stoq_conn_write(stoq_conn *c, uint8_t *buf, size_t cap, size_t max_pkts, size_t stride, size_t *segment_size,
                        struct sockaddr_in6 *remote, struct sockaddr_in6 *local, uint8_t *ecn, uint64_t now);

/** Whether the connection failed because the peer's certificate was refused (mutual TLS). */
int stoq_conn_peer_refused(const stoq_conn *c);

/** Server: the identity the peer check wrote when it accepted the client's certificate
 *  (mutual TLS), "" when the client presented none. Set once, during the handshake. */
const char *stoq_conn_peer_identity(const stoq_conn *c);

/** Writes the CONNECTION_CLOSE for the connection's error (or a graceful close with `app_error`
 *  when there is none). Returns its length, 0 if nothing is owed, or <0. */
ssize_t stoq_conn_write_close(stoq_conn *c, uint8_t *buf, size_t cap, uint64_t app_error, uint64_t now);

/** Server: starts HTTP/3's graceful shutdown (RFC 9114 §5.2): a GOAWAY naming the last request
 *  stream received, so the requests the client sent keep going and any later one is rejected
 *  (H3_REQUEST_REJECTED: never processed, safe to retry elsewhere). 0, or -1 when the
 *  connection has no HTTP/3 yet (mid-handshake: close it instead). */
int stoq_conn_goaway(stoq_conn *c);
/** Client: whether the server started a graceful shutdown (its GOAWAY came): requests no
 *  longer go on this connection (stoq_conn_submit_request refuses them); those it sent that the
 *  server will not process end with H3_REQUEST_REJECTED, to be sent again on another. */
int stoq_conn_peer_going_away(const stoq_conn *c);
/** Request streams the connection has open (not yet closed and ended). */
uint64_t stoq_conn_streams_open(const stoq_conn *c);

/* ---- The SIGBUS guard (stoq_guard.c) ------------------------------------------ */

/** Mappings the guard holds at once; past this stoq_guard_add refuses. */
#define STOQ_GUARD_SLOTS 65536u

/** Distinct mappings a thread records as faulted between two clears; past that every guarded
 *  mapping counts as hit (stoq_guard_hit). */
#define STOQ_GUARD_FAULTS 8u

/** Installs the process's SIGBUS handler (once; later calls do nothing): a read past the end
 *  of a file that shrank under a registered mapping then reads a page of zeros instead of
 *  ending the process, and the mapping is recorded for the thread (stoq_guard_faulted).
 *  0, or -1 (errno). */
int stoq_guard_install(void);
/** Registers the mapping [base, base+len): a slot to pass to stoq_guard_remove; -1 when no
 *  handler is installed (the mapping is not guarded, as without the guard); -2 when every
 *  slot is taken (the caller must not send from the mapping). */
long stoq_guard_add(const void *base, size_t len);
void stoq_guard_remove(long slot);
/** Whether a guarded mapping faulted on this thread since the last stoq_guard_clear. */
int stoq_guard_faulted(void);
/** Whether [base, base+len) overlaps a mapping that faulted on this thread since the last clear. */
int stoq_guard_hit(const void *base, size_t len);
/** Forgets this thread's faulted mappings. */
void stoq_guard_clear(void);
/** Resets (with `code`) every stream of `c` whose queued body lies in a mapping that faulted
 *  on this thread, then clears the thread's record. How many. Call after a stoq_conn_write
 *  that faulted and drop what it wrote: the packet that write held back for the next call is
 *  dropped here (each as if lost). */
int stoq_conn_reset_faulted_streams(stoq_conn *c, uint64_t code);

/** Next time stoq_conn_handle_expiry must run (ns, UINT64_MAX for never). */
uint64_t stoq_conn_expiry(stoq_conn *c);
/** Runs timers that are due. Returns STOQ_CONN_OK or an error as for read. */
int stoq_conn_handle_expiry(stoq_conn *c, uint64_t now);
/** The drain/closing deadline once closing or draining (3 PTO). */
uint64_t stoq_conn_close_deadline(stoq_conn *c, uint64_t now);

/** Starts a key update (for tests and for policy). Returns 0 or an ngtcp2 error code. */
int stoq_conn_initiate_key_update(stoq_conn *c, uint64_t now);
/** 1-RTT packets received and decrypted with key phase bit `phase` (0 or 1). */
uint64_t stoq_conn_rx_key_phase_packets(const stoq_conn *c, int phase);
/** Packets dropped for being numbered one below the largest received in their space (a guard
 *  against an ngtcp2 0.12.1 abort; see cb_decrypt in stoq_conn.c). */
uint64_t stoq_conn_rx_below_largest_dropped(const stoq_conn *c);
/** The connection's application pointer. */
void stoq_conn_set_app(stoq_conn *c, void *app);
void *stoq_conn_get_app(const stoq_conn *c);
/** Handshake done? */
int stoq_conn_is_established(const stoq_conn *c);
/** Handshake confirmed (RFC 9001 §4.1.2)? A client completes its handshake before the server
 *  has checked its certificate; it is confirmed once the server has taken it (HANDSHAKE_DONE). */
int stoq_conn_is_confirmed(const stoq_conn *c);
/** The peer closed the connection with a TLS alert (CRYPTO_ERROR: it refused a certificate,
 *  perhaps after the handshake completed here) or CONNECTION_REFUSED (its limits, its drain). */
int stoq_conn_refused_by_peer(const stoq_conn *c);
/** Bidirectional streams this end may still open under the peer's MAX_STREAMS. */
uint64_t stoq_conn_bidi_streams_left(stoq_conn *c);
/** Whether the handshake resumed an earlier session (a TLS 1.3 PSK from a session ticket). */
int stoq_conn_is_resumed(const stoq_conn *c);
/** The TLS cipher suite the handshake agreed on, by its IANA name (TLS_AES_128_GCM_SHA256 ...);
 *  NULL before the handshake completed. */
const char *stoq_conn_cipher_suite(const stoq_conn *c);
/** Whether the connection still holds its TLS session (a server frees it after the handshake,
 *  a client once it has the server's ticket). */
int stoq_conn_holds_tls(const stoq_conn *c);
/** Whether the server accepted the client's 0-RTT data (server: so far; client: once the
 *  handshake completed). */
int stoq_conn_early_data_accepted(const stoq_conn *c);
/** Client, before the first packet is written: offer the session `data` (a blob an earlier
 *  connection's `stoq_conn_session` gave) for resumption. 0, or -1 when GnuTLS refuses it
 *  (the handshake is then a full one). Which sessions to offer is the caller's choice
 *  (`QUICConnection.offerSession`). */
int stoq_conn_set_session(stoq_conn *c, const uint8_t *data, size_t len);
/** The TLS cipher suites the connection offers (client) or accepts (server), in order: their
 *  IANA names separated by ':' into `buf` (NUL-terminated; STOQ_SUITES_MAX holds all). Returns
 *  the length. */
#define STOQ_SUITES_MAX 128
size_t stoq_conn_offered_suites(const stoq_conn *c, char *buf, size_t cap);
/** Client: the session the server's ticket resumes (the newest in the packet that brought the
 *  first; the TLS session goes after it), to keep for the next
 *  connection (`*data` lives as long as the connection or the next ticket); 0: none yet. */
size_t stoq_conn_session(const stoq_conn *c, const uint8_t **data);

/** Client, once established: what 0-RTT must remember of the server (RFC 9000 §7.4.1): its
 *  stream and flow control limits, encoded as transport parameters are on the wire (RFC 9000
 *  §18), so a blob kept on disk means the same to any ngtcp2. Keep it with the session. Returns
 *  its length, or -1 (not a client, not established, `cap` too small). */
ssize_t stoq_conn_early_params(stoq_conn *c, uint8_t *buf, size_t cap);
/** Client, after stoq_conn_set_session took a session and before the first packet: `data` (an
 *  earlier connection's stoq_conn_early_params) lets requests go now, in 0-RTT. Only on an
 *  endpoint with `early_data`. Returns 0 (submit requests at once), or -1 when the blob does
 *  not decode or allows no requests (then wait for the handshake, as without it). If the
 *  server refuses the early data, each request sent in it is sent again after the handshake,
 *  on a new stream id under the same handle: the application does not see it. */
int stoq_conn_set_early_params(stoq_conn *c, const uint8_t *data, size_t len);
/** Client: what became of 0-RTT, once established. */
enum {
  STOQ_EARLY_NONE = 0,     /* none was sent (no session or parameters, or no 0-RTT keys) */
  STOQ_EARLY_ACCEPTED = 1, /* requests went in 0-RTT and the server took them */
  STOQ_EARLY_REJECTED = 2, /* requests went in 0-RTT, the server refused them: sent again */
};
int stoq_conn_early_data(const stoq_conn *c);
/** The remote address of the current path. */
void stoq_conn_remote(const stoq_conn *c, struct sockaddr_in6 *out);
/** The local address of the current path. */
void stoq_conn_local(const stoq_conn *c, struct sockaddr_in6 *out);

/** Client: what became of the server's preferred address (RFC 9000 §9.6). */
enum {
  STOQ_PREFERRED_NONE = 0,       /* the server offered none (or not an IPv6 one) */
  STOQ_PREFERRED_VALIDATING = 1, /* offered and chosen: path validation under way */
  STOQ_PREFERRED_USED = 2,       /* validated: the connection runs to it now */
  STOQ_PREFERRED_FAILED = 3,     /* validation failed: the connection stayed where it was */
};
int stoq_conn_preferred_address_state(const stoq_conn *c);

/** Path validations that ended, by outcome (either side; the preferred address's included). */
uint64_t stoq_conn_paths_validated(const stoq_conn *c);
uint64_t stoq_conn_paths_failed(const stoq_conn *c);

/** Client: moves the connection to `local` (its own address changed: the old one is gone),
 *  at once, validating the new path as it goes (RFC 9000 §9.2). 0, or an ngtcp2 error code
 *  (no spare connection ID, handshake not confirmed, already on `local`). */
int stoq_conn_migrate(stoq_conn *c, const struct sockaddr_in6 *local, uint64_t now);
/** The last error, human readable ("" if none). */
const char *stoq_conn_error_string(const stoq_conn *c);

/** Per-connection counters. No count of lost packets: ngtcp2 0.12 exports none (not in
 *  ngtcp2_conn_stat; a lost packet reaches only its qlog and debug log, too costly to run for a
 *  count, and lost_datagram, for DATAGRAM frames STOQ does not send). */
typedef struct stoq_conn_stats {
  uint64_t bytes_in_flight, cwnd, smoothed_rtt_ns, rttvar_ns, min_rtt_ns;
  uint64_t body_bytes_received, body_bytes_sent;
  uint64_t streams_open;
} stoq_conn_stats;
void stoq_conn_get_stats(const stoq_conn *c, stoq_conn_stats *out);
/** How long ngtcp2 0.12 holds an acknowledgement back (ns): an eighth of the smoothed RTT, at
 *  most this end's max_ack_delay. An ACK owed for a packet received at t goes out with the
 *  first write at or after t + this. */
uint64_t stoq_conn_ack_delay(const stoq_conn *c);

/* ---- HTTP/3 streams --------------------------------------------------------- */

/** A response or request header beyond the pseudo-headers. */
typedef struct stoq_header {
  const char *name;
  const char *value;
} stoq_header;

/** What stoq_stream_respond and stoq_stream_respond_streamed return for a stream already
 *  answered: nothing was sent, and the first answer goes on. Other failures are nghttp3's codes. */
#define STOQ_ERR_ANSWERED (-1001)
/** What they return for more than STOQ_MAX_HEADERS header fields: nothing was sent. */
#define STOQ_ERR_HEADERS (-1002)

/** Server: answers a request. `body`/`body_len` is a region that stays valid until `release(arg)`
 *  is called, which the stream owns from the call on whatever it returns: once the peer has
 *  acknowledged it (or at stream close), or before a refusal returns (STOQ_ERR_ANSWERED,
 *  STOQ_ERR_HEADERS, or an nghttp3 error). NULL/0 with `has_body` = 0 sends headers only (HEAD, errors).
 *  On a stream marked with stoq_stream_set_no_content the body is never sent (released at close). */
int stoq_stream_respond(stoq_conn *c, stoq_stream *s, int status, const stoq_header *hdrs, size_t nhdrs,
                        const uint8_t *body, uint64_t body_len, int has_body, void (*release)(void *), void *arg);

/** Server: the response to this request carries no content whatever the application answers
 *  (a HEAD request: RFC 9110 §9.3.2; nghttp3 clients close the connection on a HEAD response
 *  with DATA). The application's HTTP layer decides; this only keeps the body off the wire. */
void stoq_stream_set_no_content(stoq_stream *s);

/** Most body pieces a streamed response holds at once (sent and not yet acknowledged, or queued). */
#define STOQ_BODY_PIECES 32

/** Server: answers a request with a body the application supplies piece by piece with
 *  stoq_stream_body_append, as on_body_wanted asks; each piece is released as soon as the
 *  peer has acknowledged all of it, so a large body never sits in memory whole. On a stream
 *  marked with stoq_stream_set_no_content the answer is the head alone: the stream ends with
 *  it, and stoq_stream_body_append refuses pieces (-1). */
int stoq_stream_respond_streamed(stoq_conn *c, stoq_stream *s, int status, const stoq_header *hdrs, size_t nhdrs);

/** Appends a piece (valid until `release(arg)`); `eof` marks the last. Returns 0, or -1 when
 *  STOQ_BODY_PIECES are already held (wait for on_body_wanted) or the body already ended (a
 *  HEAD's, with its head). */
int stoq_stream_body_append(stoq_conn *c, stoq_stream *s, const uint8_t *base, uint64_t len, int eof,
                            void (*release)(void *), void *arg);

/** `has_body` of stoq_conn_submit_request for a body given piece by piece. */
#define STOQ_BODY_STREAMED 2

/** Client: sends a request; returns the stream or NULL (err filled). Body as for respond, or
 *  with `has_body` STOQ_BODY_STREAMED (and no `body`) streamed: pieces come with
 *  stoq_stream_body_append, as on_body_wanted asks. Before the handshake completes only with
 *  stoq_conn_set_early_params, and without a body: the request goes in 0-RTT (which method may
 *  is the application's rule). */
stoq_stream *stoq_conn_submit_request(stoq_conn *c, const char *method, const char *authority, const char *path,
                                      const stoq_header *hdrs, size_t nhdrs, const uint8_t *body, uint64_t body_len,
                                      int has_body, void (*release)(void *), void *arg, void *app, char *err,
                                      size_t errlen);

/** Routes the peer's body for this stream to `fd` (pwrite from `offset`; write() for a pipe or
 *  socket; -1 discards). At most `limit` bytes are accepted; more resets the stream. With
 *  `hash` the body's SHA-256 is kept. Writes happen on the endpoint's writer thread: `fd`
 *  must stay open until the stream closes (on_stream_close comes after the last write), and
 *  a server hears on_request_end only once the whole body is written. */
void stoq_stream_set_sink(stoq_stream *s, int fd, uint64_t offset, uint64_t limit, int hash);
/** Body bytes received so far, and whether writing them to the sink failed (errno, 0 if fine). */
uint64_t stoq_stream_received(const stoq_stream *s);
/** on_body_mark once `bytes` of body have been received (0 clears it). */
void stoq_stream_set_body_mark(stoq_stream *s, uint64_t bytes);
/** Server: the request's announced body length (its content-length), for what a timeout says;
 *  UINT64_MAX (the default): none announced. */
void stoq_stream_set_expected_length(stoq_stream *s, uint64_t bytes);
uint64_t stoq_stream_expected_length(const stoq_stream *s);
/** Server: response body bytes the peer acknowledged so far; `given` (may be NULL): those given
 *  to send. */
uint64_t stoq_stream_body_acked(const stoq_stream *s, uint64_t *given);
int stoq_stream_sink_errno(const stoq_stream *s);
/** Copies the SHA-256 of the received body (32 bytes) once the body has ended. Returns 0 if available. */
int stoq_stream_body_sha256(stoq_stream *s, uint8_t out[32]);
/** Whether the peer finished the body (fin seen). */
int stoq_stream_body_complete(const stoq_stream *s);
/** A value the application keeps on the stream: a response's Cache-Control max-age in seconds
 *  (the application parses the head and sets it), -1 when none. */
int64_t stoq_stream_max_age(const stoq_stream *s);
void stoq_stream_set_max_age(stoq_stream *s, int64_t max_age);
/** Server: the status of the response sent on the stream, 0 before one is. */
int stoq_stream_status(const stoq_stream *s);
/** Abandons a stream in both directions with an HTTP/3 error code. On a client, nothing more
 *  reaches the stream's sink once this returns (queued writes have landed), and the application
 *  hears the stream closed with that code from stoq_conn_end_abandoned_streams, whether or not
 *  the server answers the reset. */
void stoq_stream_reset(stoq_conn *c, stoq_stream *s, uint64_t app_error_code);
/** Client: tells the application (on_stream_close) of each stream it reset since the last call;
 *  returns how many. Call outside callbacks, before writing: the application may close the
 *  connection from on_stream_close. */
int stoq_conn_end_abandoned_streams(stoq_conn *c);
/** Per-stream application pointer. */
void stoq_stream_set_app(stoq_stream *s, void *app);
void *stoq_stream_get_app(const stoq_stream *s);
int64_t stoq_stream_id(const stoq_stream *s);

/** HTTP/3 error codes the application uses. */
#define STOQ_H3_NO_ERROR 0x0100
#define STOQ_H3_INTERNAL_ERROR 0x0102
#define STOQ_H3_REQUEST_REJECTED 0x010b
#define STOQ_H3_REQUEST_CANCELLED 0x010c
#define STOQ_H3_EXCESSIVE_LOAD 0x0107
#define STOQ_H3_MESSAGE_ERROR 0x010e

/** Random bytes from GnuTLS's CSPRNG. */
int stoq_random(uint8_t *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
