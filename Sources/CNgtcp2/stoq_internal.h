/*
 * What the CNgtcp2 files share, and nothing else includes: the structs behind the public
 * handles and the few helpers one file calls in another. Private to the target (it is not
 * under include/), and every function here is hidden so none leaves the library.
 */
#ifndef STOQ_INTERNAL_H
#define STOQ_INTERNAL_H

#include "CNgtcp2.h"
#include "stoq_kern_user.h" /* the CID layout make_cid follows */

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <nghttp3/nghttp3.h>
#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>

#define STOQ_HIDDEN __attribute__((visibility("hidden")))

struct stoq_tls_ctx {
  gnutls_certificate_credentials_t cred;
  int is_server;
  int insecure;
  /* mutual TLS (server side) */
  int client_auth;
  /* the certificate policy (Swift's PeerVerifier), either side: the only judge of a chain */
  stoq_peer_check_fn peer_check;
  void *peer_check_ctx;
  /* the suites offered or accepted (stoq_tls_set_cipher_suites); NULL: the default */
  gnutls_priority_t priority;
  /* the suites offered, in order (indices into stoq_tls.c's table); n_suites 0: all of them */
  uint8_t suites[8];
  uint8_t n_suites;
};

typedef struct stoq_sink_writer stoq_sink_writer;

/* ---- stoq_mem.c: the libraries' allocator ---- */

/* Whole pages for blocks of a page and more, from a region an endpoint reserves. */
typedef struct stoq_pages stoq_pages;
STOQ_HIDDEN stoq_pages *stoq_pages_new(void);
STOQ_HIDDEN void stoq_pages_free(stoq_pages *p);
/* Gives every warm freed block's pages back to the kernel. */
STOQ_HIDDEN void stoq_pages_release(stoq_pages *p);
/* The freed blocks' bytes still resident, and how many blocks went back to the kernel so far. */
STOQ_HIDDEN void stoq_pages_read(const stoq_pages *p, uint64_t *warm_bytes, uint64_t *released, uint64_t *cold_runs,
                                 uint64_t *cold_bytes);

/* The user_data of an ngtcp2_mem or nghttp3_mem: the pages, and what the library holds. */
/* The stall watch's two lists (stoq_stall.c): streams receiving a request head or body
 * (WATCH_RX) and streams holding body bytes the peer has not acknowledged (WATCH_TX). A stream's
 * links into each live in the stream; a list's cursor is its sweep's next stream, moved on when
 * that stream leaves the list during a report. */
enum { WATCH_RX, WATCH_TX };
struct stoq_watch_link {
  stoq_stream *prev, *next;
  uint8_t on;
};
struct stoq_watch_list {
  stoq_stream *head, *cursor;
};

typedef struct stoq_mem_user {
  stoq_pages *pages;
  int64_t bytes;
} stoq_mem_user;
STOQ_HIDDEN void *stoq_mem_malloc(size_t size, void *user);
STOQ_HIDDEN void *stoq_mem_calloc(size_t n, size_t size, void *user);
STOQ_HIDDEN void stoq_mem_free(void *q, void *user);
STOQ_HIDDEN void *stoq_mem_realloc(void *q, size_t size, void *user);

struct stoq_endpoint_ctx {
  int is_server;
  stoq_tls_ctx *tls;
  stoq_settings s;
  stoq_events ev;
  /* Connections may outlive the endpoint (an application still holds one): each holds a
   * reference, and freeing the endpoint only silences its events; the memory goes with
   * the last reference. */
  unsigned refs;
  /* qlog: the directory (O_PATH, -1: off) and the sampling threshold out of 2^32 */
  int qlog_dirfd;
  uint64_t qlog_threshold;
  /* received bodies go to files through this writer thread (stoq_sink.c); NULL: written inline */
  stoq_sink_writer *sink;
  uint64_t sink_ring_bytes;          /* what its ring holds: no stream window is larger */
  unsigned qlog_open, qlog_max_open; /* connections with a qlog file open, and the most */
  stoq_qlog_stats qlog_stats;
  /* ngtcp2's and nghttp3's allocators (stoq_mem.c), each counting what its library holds;
   * used only on the endpoint's thread, as its connections are */
  stoq_pages *pages;
  stoq_mem_user ngtcp2_user, nghttp3_user;
  ngtcp2_mem ngtcp2_mem;
  nghttp3_mem nghttp3_mem;
  /* Stalled streams (stoq_endpoint_ctx_sweep): the endpoint's clock as last given, and the
   * streams watched (a server's only), by WATCH_RX / WATCH_TX. */
  uint64_t now;
  struct stoq_watch_list watching[2];
};

struct stoq_stream {
  int64_t id;
  stoq_conn *conn;
  stoq_stream *prev, *next;
  void *app;
  /* the head being received: its fields packed as stoq_head describes, in a buffer of head_cap
     bytes (NULL before the first field and between heads) */
  uint8_t *head;
  size_t head_cap, head_len, head_nfields, head_dropped;
  uint8_t in_head; /* begun and not handed to the application (still so once refused) */
  uint64_t head_section;
  int64_t max_age; /* the application's (Swift parses Cache-Control); -1: none */
  int fin_with_headers;
  int body_complete;
  int reset_by_peer;
  int transport_closed; /* the transport closed it while nghttp3 keeps it (see stream_outlived) */
  /* client: reset by the application (1), which has since heard the stream closed (2): the
     stream waits detached from nghttp3 for the transport to let it go (see stoq_stream_reset) */
  int abandoned;
  uint64_t abandon_code;
  int responded;
  int no_content; /* stoq_stream_set_no_content: the response sends no DATA (a HEAD's) */
  int status;     /* the response's status once sent (0: none yet), for the application's spans */
  /* Body we send: pieces, each released once the peer acknowledged all of it. A whole-region
   * body is one piece that ends the body; a streamed one gets pieces as on_body_wanted asks. */
  int stream_eof, stream_blocked;
  struct body_piece {
    const uint8_t *base;
    uint64_t len;
    void (*release)(void *);
    void *arg;
  } pieces[STOQ_BODY_PIECES];
  unsigned p_head, p_count, p_read; /* ring start, pieces held, pieces fully read (from head) */
  uint64_t p_read_off;              /* read position inside piece p_read */
  uint64_t p_acked;                 /* body bytes the peer acknowledged, not yet released */
  /* Stall watch (server): in the endpoint's lists while receiving a request head or body (rx)
   * and while holding body bytes the peer has not acknowledged (tx), and when each last moved
   * (a head: when it began). */
  struct stoq_watch_link watch[2]; /* by WATCH_RX / WATCH_TX */
  uint8_t rx_refused;              /* head refused, body timed out, or answered before its end: the rest is dropped */
  uint64_t rx_moved, tx_moved;     /* endpoint clock */
  uint64_t tx_given, tx_acked;     /* body bytes given to send (with a reader), and acknowledged */
  uint64_t tx_window, tx_window_acked; /* when the current min_send_rate window began, tx_acked then */
  uint64_t expected;                   /* the announced body length (UINT64_MAX: none) */
  /* body we receive */
  int sink_fd;
  uint64_t sink_off, sink_limit, received;
  uint64_t mark; /* on_body_mark once `received` reaches it (0: none) */
  int sink_errno;
  /* received body is staged in a writer buffer (wlen bytes so far), queued to the endpoint's
     writer when full; `pending` jobs are queued and not yet reaped, the last as `last_seq` */
  uint8_t *wbuf;
  size_t wlen;
  unsigned pending;
  uint64_t last_seq;
  int queued_sink; /* bytes go through the writer (a file to write) */
  int seq_write;   /* the sink is a pipe or socket: write(), not pwrite() */
  int end_waiting; /* the body ended; its end is announced once nothing is pending */
  int end_told;    /* server: on_request_end was called (it is, once per request) */
  int hashing;
  int digest_done;
  /* client, a request sent in 0-RTT: a copy of its head, to send again in 1-RTT if the server
     refuses the early data (freed once the handshake has decided) */
  nghttp3_nv *early_nv;
  size_t early_nvlen;
  gnutls_hash_hd_t hash;
  uint8_t digest[32];
};

struct stoq_conn {
  stoq_endpoint_ctx *ep;
  ngtcp2_conn *q;
  gnutls_session_t tls;       /* NULL once a server's handshake is done (release_tls) */
  int tls_resumed, tls_early; /* what the session said before release_tls */
  int tls_cipher;             /* ditto: its gnutls_cipher_algorithm_t */
  stoq_tls_ctx *tls_ctx;      /* the credentials the session was made with (they may rotate since) */
  int peer_refused;           /* mutual TLS refused the peer's certificate */
  /* What the peer check said the peer is ("" = none): a client's roles, key id and subject;
   * on a client, the server's node id. */
  char peer_identity[STOQ_PEER_IDENTITY_MAX];
  ngtcp2_crypto_conn_ref ref;
  nghttp3_conn *h3;
  struct sockaddr_in6 local, remote;
  ngtcp2_connection_close_error last_error;
  int has_error;
  char errstr[400]; /* room for a refusal that names the certificate's SANs */
  void *app;
  stoq_stream *streams;
  uint64_t streams_open;
  size_t head_bytes;   /* its streams' head buffers (at most STOQ_HEAD_BYTES_MAX) */
  int64_t h3_closed;   /* the request stream nghttp3 last closed (h3_stream_close; see cb_stream_close) */
  unsigned abandoned;  /* streams whose application has yet to hear of its own reset */
  int peer_going_away; /* client: the server's GOAWAY came (h3_shutdown) */
  uint64_t body_rx, body_tx;
  uint64_t tx_moved;    /* endpoint clock when the peer last acknowledged body bytes of any stream */
  uint64_t sink_staged; /* body bytes its streams staged for the writer, not yet queued */
  int is_server;
  int established;
  int confirmed;       /* the handshake is confirmed (RFC 9001 §4.1.2): the peer took it whole */
  int refused_by_peer; /* the peer closed with a TLS alert or CONNECTION_REFUSED */
  int paced;           /* an RTT sample exists: packets count toward pacing (see stoq_conn_write) */
  /* a packet that could not join the previous GSO run; sent first next time */
  uint8_t *pending;
  size_t pending_len;
  struct sockaddr_in6 pending_remote;
  struct sockaddr_in6 pending_local;
  uint8_t pending_ecn;
  size_t max_pkt;
  char verify_name[256];    /* what the client dialled: the server's certificate must name it */
  uint64_t rx_key_phase[2]; /* 1-RTT packets decrypted with key phase bit 0 / 1 */
  struct stoq_qlog *qlog;   /* NULL unless this connection was sampled (stoq_qlog.c) */
  gnutls_datum_t session;   /* client: the session the newest ticket resumes (gnutls_free'd) */
  int session_offered;      /* client: GnuTLS took an earlier session (stoq_conn_set_session) */
  int early;                /* client: HTTP/3 set up on the server's remembered parameters: 0-RTT */
  int early_outcome;        /* client: STOQ_EARLY_* once the handshake decided */
  int preferred;            /* client: STOQ_PREFERRED_* */
  uint64_t paths_validated, paths_failed;
  /* The largest packet number decrypted in each space (Initial, Handshake, application; -1
   * before any), `tx_built` when it was, and the packets dropped for being numbered one below
   * it (see cb_decrypt). `tx_built` counts the datagrams ngtcp2 has built. */
  int64_t rx_largest[3];
  uint64_t rx_largest_built[3];
  uint64_t tx_built;
  uint64_t rx_below_largest_dropped;
};

/* Fills `err` (may be NULL) printf-style. */
STOQ_HIDDEN void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Records why the connection failed (its error string). */
STOQ_HIDDEN void conn_fail(stoq_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* ngtcp2_crypto's way from a TLS session back to its QUIC connection. */
STOQ_HIDDEN ngtcp2_conn *get_conn(ngtcp2_crypto_conn_ref *ref);
/* The connection ngtcp2_conn_read_pkt is reading for (stoq_io.c sets it around the call): the
   decrypt callback counts key phases on it (stoq_conn.c). */
STOQ_HIDDEN extern _Thread_local stoq_conn *reading_conn;

/* TLS (stoq_tls.c): a connection's GnuTLS session; refusing the peer's certificate. */
STOQ_HIDDEN int setup_tls(stoq_conn *c, const char *server_name);
STOQ_HIDDEN int refuse_peer(stoq_conn *c, const char *why);
/* Session tickets: the process's ticket key made (0, or GnuTLS's error); a server connection
   sends its client a ticket (after the handshake, if tickets are on). */
STOQ_HIDDEN int ticket_key_ready(void);
STOQ_HIDDEN void send_session_ticket(stoq_conn *c);
/* Server, handshake done and ticket sent: frees the GnuTLS session (see stoq_tls.c). */
STOQ_HIDDEN void release_tls(stoq_conn *c);

/* Streams (stoq_h3.c). */
STOQ_HIDDEN stoq_stream *stream_new(stoq_conn *c, int64_t id);
STOQ_HIDDEN void stream_free(stoq_conn *c, stoq_stream *s);
/* The stream ends: its queued writes land, the application hears it closed (once; with its own
   code if it reset the stream, else `code`) and it is freed. */
STOQ_HIDDEN void stream_end(stoq_conn *c, stoq_stream *s, uint64_t code);
/* Stream `id` of `c` (NULL: none; a walk of the connection's streams, for rare events). */
STOQ_HIDDEN stoq_stream *stream_find(stoq_conn *c, int64_t id);
/* Server: the client reset request stream `s`'s body (RESET_STREAM). */
STOQ_HIDDEN void request_body_reset(stoq_conn *c, stoq_stream *s);
/* nghttp3 found request stream `id`'s message malformed (its body against its content-length):
   nothing more of it is read; an answer already given goes on, else the stream is reset with
   H3_MESSAGE_ERROR. 0, or nghttp3's error. */
STOQ_HIDDEN int malformed_message(stoq_conn *c, int64_t id);
/* The transport closed request stream `id`, which nghttp3 keeps (a head waiting for QPACK):
   nothing more is read or sent on it. 0, or nghttp3's error. */
STOQ_HIDDEN int stream_outlived(stoq_conn *c, int64_t id);
/* A head is refused before the application saw it (too large for the connection, or timed
   out): nothing more of the stream is read, and it is reset with `code`. */
STOQ_HIDDEN void refuse_head(stoq_conn *c, stoq_stream *s, uint64_t code);
/* The stall watch (stoq_stall.c): a server stream starts receiving a head or a body, or holds
   `given` more body bytes to send; leaves the lists (its head or body ended, was acknowledged,
   reset, or it goes). */
STOQ_HIDDEN void watch_rx(stoq_stream *s);
STOQ_HIDDEN void unwatch_rx(stoq_stream *s);
STOQ_HIDDEN void watch_tx(stoq_stream *s, uint64_t given);
STOQ_HIDDEN void unwatch_tx(stoq_stream *s);
/* Gives back flow control for `n` bytes of stream data nghttp3 is done with. */
STOQ_HIDDEN void consume(stoq_conn *c, int64_t stream_id, size_t n);
/* Opens HTTP/3 once the application keys are there (client: or 0-RTT's). */
STOQ_HIDDEN int setup_h3(stoq_conn *c);
/* Client: the server refused 0-RTT. HTTP/3 starts over and each request in it goes again. */
STOQ_HIDDEN int resend_early_requests(stoq_conn *c);
/* Forgets the copies of requests sent in 0-RTT (the handshake decided). */
STOQ_HIDDEN void drop_early_copies(stoq_conn *c);

/* Body sinks (stoq_sink.c): the endpoint's writer; taking body bytes (returns how many were
   queued: their credit comes back when written); the end of a body (announced once written);
   waiting for a stream's writes before it closes (`closing`) or changes sink. */
STOQ_HIDDEN stoq_sink_writer *sink_writer_new(stoq_endpoint_ctx *ep, uint64_t ring_bytes);
STOQ_HIDDEN void sink_writer_free(stoq_sink_writer *w);
STOQ_HIDDEN size_t sink_take(stoq_stream *s, const uint8_t *data, size_t len);
STOQ_HIDDEN void sink_flush(stoq_stream *s);
STOQ_HIDDEN void sink_end(stoq_stream *s);
STOQ_HIDDEN void sink_drain(stoq_stream *s, int closing);
STOQ_HIDDEN void stream_finish_digest(stoq_stream *s);

/* qlog (stoq_qlog.c): samples the connection and, if chosen, opens its file and points
   `st`'s qlog at it; frees it (after ngtcp2_conn_del has written the end). */
STOQ_HIDDEN void qlog_attach(stoq_conn *c, ngtcp2_settings *st, const ngtcp2_cid *odcid);
STOQ_HIDDEN void qlog_free(stoq_conn *c);

/* Connections (stoq_conn.c). */
STOQ_HIDDEN ngtcp2_path make_path(struct sockaddr_in6 *local, struct sockaddr_in6 *remote);

#endif
