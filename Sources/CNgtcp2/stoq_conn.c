/*
 * One STOQ connection's life: the endpoint context connections share, accepting and dialling,
 * the ngtcp2 callbacks, and freeing. Packets in and out are in stoq_io.c.
 *
 * Why C: ngtcp2 drives a connection through some thirty C callbacks that take its own structs
 * by pointer and run inside ngtcp2_conn_read_pkt / write; answering them in C keeps those
 * structs and their versioned layouts out of Swift, and costs no bridging per packet. See
 * include/CNgtcp2.h for what the whole shim promises.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ngtcp2/ngtcp2_crypto.h>

/* How long a Retry token stays good. */
#define RETRY_TOKEN_TIMEOUT (10ull * NGTCP2_SECONDS)

int stoq_random(uint8_t *buf, size_t len) { return gnutls_rnd(GNUTLS_RND_RANDOM, buf, len) == 0 ? 0 : -1; }

void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (!err || !errlen) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

void conn_fail(stoq_conn *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->errstr, sizeof(c->errstr), fmt, ap);
  va_end(ap);
}

/* ---- Endpoint context ----------------------------------------------------- */

void stoq_endpoint_ctx_mem_stats(const stoq_endpoint_ctx *ep, stoq_mem_stats *out) {
  out->ngtcp2_bytes = ep->ngtcp2_user.bytes > 0 ? (uint64_t)ep->ngtcp2_user.bytes : 0;
  out->nghttp3_bytes = ep->nghttp3_user.bytes > 0 ? (uint64_t)ep->nghttp3_user.bytes : 0;
  stoq_pages_read(ep->pages, &out->pages_warm_bytes, &out->pages_released, &out->pages_cold_runs,
                  &out->pages_cold_bytes);
}

void stoq_endpoint_ctx_release_memory(stoq_endpoint_ctx *ep) { stoq_pages_release(ep->pages); }

stoq_endpoint_ctx *stoq_endpoint_ctx_new(int is_server, stoq_tls_ctx *tls, const stoq_settings *s,
                                         const stoq_events *ev) {
  stoq_endpoint_ctx *ep = calloc(1, sizeof(*ep));
  if (!ep) return NULL;
  ep->is_server = is_server;
  ep->tls = tls;
  ep->s = *s;
  ep->ev = *ev;
  ep->refs = 1;
  ep->qlog_dirfd = -1;
  ep->pages = stoq_pages_new();
  if (!ep->pages) {
    free(ep);
    return NULL;
  }
  ep->ngtcp2_user = (stoq_mem_user){ep->pages, 0};
  ep->nghttp3_user = (stoq_mem_user){ep->pages, 0};
  ep->ngtcp2_mem = (ngtcp2_mem){&ep->ngtcp2_user, stoq_mem_malloc, stoq_mem_free, stoq_mem_calloc, stoq_mem_realloc};
  ep->nghttp3_mem = (nghttp3_mem){&ep->nghttp3_user, stoq_mem_malloc, stoq_mem_free, stoq_mem_calloc, stoq_mem_realloc};
  /* The writer's ring holds one stream window (fill_settings keeps windows within it):
   * ngtcp2's own default window when none is set, 4 MB … 256 MB. */
  uint64_t ring = s->max_stream_window ? s->max_stream_window : 6ull << 20;
  if (ring < s->initial_max_stream_data) ring = s->initial_max_stream_data;
  if (ring < (4ull << 20)) ring = 4ull << 20;
  if (ring > (256ull << 20)) ring = 256ull << 20;
  ring = (ring + (256u << 10) - 1) & ~(uint64_t)((256u << 10) - 1);
  ep->sink_ring_bytes = ring;
  ep->sink = sink_writer_new(ep, ring);
  /* The ticket key is made when the first server endpoint starts, not mid-handshake. */
  if (is_server && s->ticket_lifetime && ticket_key_ready() != 0) {
    sink_writer_free(ep->sink);
    stoq_pages_free(ep->pages);
    free(ep);
    return NULL;
  }
  return ep;
}

static void endpoint_release(stoq_endpoint_ctx *ep) {
  if (--ep->refs) return;
  sink_writer_free(ep->sink);
  if (ep->qlog_dirfd >= 0) close(ep->qlog_dirfd);
  stoq_pages_free(ep->pages);
  free(ep);
}

void stoq_endpoint_ctx_set_tls(stoq_endpoint_ctx *ep, stoq_tls_ctx *tls) { ep->tls = tls; }
void stoq_endpoint_ctx_free(stoq_endpoint_ctx *ep) {
  stoq_events none = {0};
  ep->ev = none; /* connections still alive call no one */
  ep->tls = NULL;
  endpoint_release(ep);
}

/* ---- ngtcp2 callbacks -------------------------------------------------------- */

static void cb_rand(uint8_t *dest, size_t len, const ngtcp2_rand_ctx *ctx) {
  (void)ctx;
  stoq_random(dest, len);
}

static void make_cid(const stoq_endpoint_ctx *ep, ngtcp2_cid *cid, size_t len) {
  cid->datalen = len;
  stoq_random(cid->data, len);
  cid->data[STOQ_CID_WORKER_BYTE] = ep->s.worker_id; /* bpf/stoq_kern_user.h */
}

static int cb_get_new_connection_id(ngtcp2_conn *q, ngtcp2_cid *cid, uint8_t *token, size_t cidlen, void *ud) {
  (void)q;
  stoq_conn *c = ud;
  make_cid(c->ep, cid, cidlen);
  if (ngtcp2_crypto_generate_stateless_reset_token(token, c->ep->s.static_secret, STOQ_SECRETLEN, cid) != 0)
    return NGTCP2_ERR_CALLBACK_FAILURE;
  if (c->ep->ev.on_cid) c->ep->ev.on_cid(c->ep->ev.ctx, c, cid->data, cid->datalen, 1);
  return 0;
}

static int cb_remove_connection_id(ngtcp2_conn *q, const ngtcp2_cid *cid, void *ud) {
  (void)q;
  stoq_conn *c = ud;
  if (c->ep->ev.on_cid) c->ep->ev.on_cid(c->ep->ev.ctx, c, cid->data, cid->datalen, 0);
  return 0;
}

static int cb_recv_stream_data(ngtcp2_conn *q, uint32_t flags, int64_t stream_id, uint64_t offset, const uint8_t *data,
                               size_t len, void *ud, void *sud) {
  (void)q;
  (void)offset;
  (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  nghttp3_ssize n = nghttp3_conn_read_stream(c->h3, stream_id, data, len, flags & NGTCP2_STREAM_DATA_FLAG_FIN);
  if (n == NGHTTP3_ERR_MALFORMED_HTTP_MESSAGING && ngtcp2_is_bidi_stream(stream_id)) {
    /* A body longer or shorter than its content-length, or an empty HEADERS frame: a stream
     * error (RFC 9114 §4.1.2), not the connection's. */
    if (malformed_message(c, stream_id) != 0) return NGTCP2_ERR_CALLBACK_FAILURE;
    consume(c, stream_id, len);
    return 0;
  }
  if (n < 0) {
    ngtcp2_connection_close_error_set_application_error(&c->last_error, nghttp3_err_infer_quic_app_error_code((int)n),
                                                        NULL, 0);
    c->has_error = 1;
    conn_fail(c, "HTTP/3: %s", nghttp3_strerror((int)n));
    return NGTCP2_ERR_CALLBACK_FAILURE;
  }
  consume(c, stream_id, (size_t)n);
  return 0;
}

static int cb_acked_stream_data_offset(ngtcp2_conn *q, int64_t stream_id, uint64_t offset, uint64_t len, void *ud,
                                       void *sud) {
  (void)q;
  (void)offset;
  (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  return nghttp3_conn_add_ack_offset(c->h3, stream_id, len) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_stream_close(ngtcp2_conn *q, uint32_t flags, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)q;
  (void)sud;
  stoq_conn *c = ud;
  if (!(flags & NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET)) code = NGHTTP3_H3_NO_ERROR;
  if (!c->h3) return 0;
  c->h3_closed = -1;
  int rv = nghttp3_conn_close_stream(c->h3, stream_id, code);
  /* A request stream HTTP/3 never saw (given up before a byte: STOP_SENDING, RESET_STREAM)
   * returns its credit here; one it saw does in h3_stream_close. */
  if (rv == NGHTTP3_ERR_STREAM_NOT_FOUND && c->is_server && ngtcp2_is_bidi_stream(stream_id))
    ngtcp2_conn_extend_max_streams_bidi(c->q, 1);
  /* Closed in nghttp3 without h3_stream_close: a request head that waits for QPACK keeps it.
   * A server's only: on a client nghttp3 also keeps a response it has not finished handing
   * over (its FIN came before the rest, under loss), which must still be read. */
  if (rv == 0 && c->is_server && ngtcp2_is_bidi_stream(stream_id) && c->h3_closed != stream_id)
    rv = stream_outlived(c, stream_id);
  if (rv != 0 && rv != NGHTTP3_ERR_STREAM_NOT_FOUND) {
    ngtcp2_connection_close_error_set_application_error(&c->last_error, nghttp3_err_infer_quic_app_error_code(rv), NULL,
                                                        0);
    c->has_error = 1;
    return NGTCP2_ERR_CALLBACK_FAILURE;
  }
  return 0;
}

static int cb_stream_reset(ngtcp2_conn *q, int64_t stream_id, uint64_t final_size, uint64_t code, void *ud, void *sud) {
  (void)q;
  (void)final_size;
  (void)code;
  (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  stoq_stream *s = c->is_server ? stream_find(c, stream_id) : NULL;
  if (s) request_body_reset(c, s);
  return nghttp3_conn_shutdown_stream_read(c->h3, stream_id) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_stream_stop_sending(ngtcp2_conn *q, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)q;
  (void)code;
  (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  /* This endpoint stopped reading the stream (ngtcp2_conn_shutdown_stream_read: a body refused,
   * timed out or answered before its end): nghttp3 stops too. A response being sent on it keeps
   * its send watch; a peer's STOP_SENDING shows up as NGTCP2_ERR_STREAM_SHUT_WR (stoq_io.c). */
  return nghttp3_conn_shutdown_stream_read(c->h3, stream_id) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_extend_max_stream_data(ngtcp2_conn *q, int64_t stream_id, uint64_t max_data, void *ud, void *sud) {
  (void)q;
  (void)max_data;
  (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  return nghttp3_conn_unblock_stream(c->h3, stream_id) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_extend_max_remote_streams_bidi(ngtcp2_conn *q, uint64_t max_streams, void *ud) {
  (void)q;
  stoq_conn *c = ud;
  if (c->h3) nghttp3_conn_set_max_client_streams_bidi(c->h3, max_streams);
  return 0;
}

static int cb_recv_tx_key(ngtcp2_conn *q, ngtcp2_crypto_level level, void *ud) {
  (void)q;
  stoq_conn *c = ud;
  if (level != NGTCP2_CRYPTO_LEVEL_APPLICATION || !c->is_server) return 0;
  return setup_h3(c) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_recv_rx_key(ngtcp2_conn *q, ngtcp2_crypto_level level, void *ud) {
  (void)q;
  stoq_conn *c = ud;
  if (level != NGTCP2_CRYPTO_LEVEL_APPLICATION || c->is_server) return 0;
  return setup_h3(c) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

/* Client, handshake done: did the server take what went in 0-RTT? GnuTLS knows from the
 * server's EncryptedExtensions. 0-RTT was sent only if its keys were made (a ClientHello that
 * offered early data); without them the requests simply waited for 1-RTT keys. Either way,
 * when the server did not take early data, ngtcp2 0.12 forgets the streams opened for it,
 * and the requests go again. */
static int settle_early_data(stoq_conn *c) {
  if (c->is_server || !c->early) return 0;
  int sent = ngtcp2_conn_get_early_crypto_ctx(c->q)->aead.native_handle != NULL;
  if (stoq_conn_early_data_accepted(c)) {
    c->early_outcome = sent ? STOQ_EARLY_ACCEPTED : STOQ_EARLY_NONE;
    drop_early_copies(c);
    return 0;
  }
  c->early_outcome = sent ? STOQ_EARLY_REJECTED : STOQ_EARLY_NONE;
  int rv = resend_early_requests(c);
  drop_early_copies(c);
  return rv;
}

/* CRYPTO data for a session release_tls freed. A server's: TLS has no message a client may
 * send then. A client's: the only message a server may send after its handshake is another
 * NewSessionTicket (RFC 9001 §4.1.3: no KeyUpdate, no post-handshake authentication), and
 * the client already kept one. */
static int cb_recv_crypto_data(ngtcp2_conn *q, ngtcp2_crypto_level level, uint64_t offset, const uint8_t *data,
                               size_t len, void *ud) {
  stoq_conn *c = ud;
  if (!c->tls && !c->is_server && level == NGTCP2_CRYPTO_LEVEL_APPLICATION) return 0;
  if (!c->tls) {
    ngtcp2_conn_set_tls_alert(q, GNUTLS_A_UNEXPECTED_MESSAGE);
    return NGTCP2_ERR_CRYPTO;
  }
  return ngtcp2_crypto_recv_crypto_data_cb(q, level, offset, data, len, ud);
}

static int cb_handshake_confirmed(ngtcp2_conn *q, void *ud) {
  (void)q;
  ((stoq_conn *)ud)->confirmed = 1;
  return 0;
}

static int cb_handshake_completed(ngtcp2_conn *q, void *ud) {
  stoq_conn *c = ud;
  if (settle_early_data(c) != 0) return NGTCP2_ERR_CALLBACK_FAILURE;
  c->established = 1;
  /* Not before: ngtcp2 0.12 would send a keep-alive PING alone in a 0-RTT packet when the
   * handshake outlasts the timeout (a lossy link), too short for the header-protection sample,
   * and abort on its assertion in ngtcp2_ppe_final (ngtcp2 issue 901, fixed in later versions). */
  if (c->ep->s.keep_alive) ngtcp2_conn_set_keep_alive_timeout(q, c->ep->s.keep_alive);
  send_session_ticket(c);
  if (c->ep->ev.on_handshake) c->ep->ev.on_handshake(c->ep->ev.ctx, c);
  return 0;
}

/* Client: the server offered a preferred address. STOQ is IPv6 only, so only its IPv6 one is
   taken; the local side stays (the same socket, bound to [::], reaches it). ngtcp2 validates
   the new path and moves there (cb_path_validation hears how it went). */
static int cb_select_preferred_addr(ngtcp2_conn *q, ngtcp2_path *dest, const ngtcp2_preferred_addr *pa, void *ud) {
  (void)q;
  stoq_conn *c = ud;
  if (!pa->ipv6_present) return 0;
  memcpy(dest->remote.addr, &pa->ipv6, sizeof(pa->ipv6));
  dest->remote.addrlen = sizeof(pa->ipv6);
  c->preferred = STOQ_PREFERRED_VALIDATING;
  return 0;
}

static int cb_path_validation(ngtcp2_conn *q, uint32_t flags, const ngtcp2_path *path,
                              ngtcp2_path_validation_result res, void *ud) {
  (void)q;
  (void)path;
  stoq_conn *c = ud;
  int ok = res == NGTCP2_PATH_VALIDATION_RESULT_SUCCESS;
  if (ok) c->paths_validated++;
  else c->paths_failed++;
  if (flags & NGTCP2_PATH_VALIDATION_FLAG_PREFERRED_ADDR)
    c->preferred = ok ? STOQ_PREFERRED_USED : STOQ_PREFERRED_FAILED;
  return 0;
}

static void cb_log(void *ud, const char *fmt, ...) {
  (void)ud;
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

ngtcp2_conn *get_conn(ngtcp2_crypto_conn_ref *ref) { return ((stoq_conn *)ref->user_data)->q; }

/* The connection ngtcp2_conn_read_pkt is reading for: ngtcp2's decrypt callback carries no
   user data, and each endpoint is driven by one thread, so a thread-local names it exactly. */
_Thread_local stoq_conn *reading_conn;

/* The packet number space of a header with protection removed (QUIC v1): 0 Initial,
   1 Handshake, 2 application (0-RTT and 1-RTT share it); -1 for none. */
static int pn_space(uint8_t first) {
  if (!(first & 0x80)) return 2;
  switch ((first >> 4) & 3) {
  case 0:
    return 0;
  case 1:
    return 2;
  case 2:
    return 1;
  default:
    return -1;
  }
}

/* RFC 9000 A.3: the full packet number from its `bits` low bits, next to `largest`. */
static int64_t decode_pn(int64_t largest, uint64_t truncated, unsigned bits) {
  int64_t expected = largest + 1, win = (int64_t)1 << bits, hwin = win / 2, mask = win - 1;
  int64_t candidate = (expected & ~mask) | (int64_t)truncated;
  if (candidate <= expected - hwin && candidate < ((int64_t)1 << 62) - win) return candidate + win;
  if (candidate > expected + hwin && candidate >= win) return candidate - win;
  return candidate;
}

/* Counts 1-RTT packets by the key phase they decrypted under, so a test can see that a peer
   moved to updated keys (RFC 9001 §6). `aad` is the header with protection removed.
   It also keeps ngtcp2 0.12.1 alive: a packet numbered one below the largest in its space,
   arriving once the ACK covering the largest was itself acknowledged, makes its
   conn_create_ack_frame build a range gap of -1 and ngtcp2_put_uvarintlen abort (the whole
   process; fixed upstream after 0.12). A peer can send that on purpose (scripts/fuzz worker
   found it: Tests/Fuzz/known-crashes/). ngtcp2 tells us neither. But that ACK was built
   after the largest arrived: a packet numbered one below the largest is taken as
   undecryptable and dropped (the peer sends its frames again) only when this connection has
   built a datagram since the largest arrived. One overtaken by its successor in the same
   receive batch, the usual reordering, is read. */
static int cb_decrypt(uint8_t *dest, const ngtcp2_crypto_aead *aead, const ngtcp2_crypto_aead_ctx *aead_ctx,
                      const uint8_t *ciphertext, size_t ciphertextlen, const uint8_t *nonce, size_t noncelen,
                      const uint8_t *aad, size_t aadlen) {
  int rv = ngtcp2_crypto_decrypt_cb(dest, aead, aead_ctx, ciphertext, ciphertextlen, nonce, noncelen, aad, aadlen);
  stoq_conn *c = reading_conn;
  if (rv != 0 || !c || aadlen == 0) return rv;
  if (!(aad[0] & 0x80)) c->rx_key_phase[(aad[0] >> 2) & 1]++;
  int space = pn_space(aad[0]);
  size_t pnlen = (size_t)(aad[0] & 3) + 1;
  if (space < 0 || aadlen < pnlen) return rv;
  uint64_t truncated = 0;
  for (size_t i = aadlen - pnlen; i < aadlen; i++) truncated = truncated << 8 | aad[i];
  int64_t pn = decode_pn(c->rx_largest[space], truncated, (unsigned)pnlen * 8);
  if (pn == c->rx_largest[space] - 1 && c->tx_built != c->rx_largest_built[space]) {
    c->rx_below_largest_dropped++;
    return NGTCP2_ERR_DECRYPT;
  }
  if (pn > c->rx_largest[space]) {
    c->rx_largest[space] = pn;
    c->rx_largest_built[space] = c->tx_built;
  }
  return rv;
}

static void fill_callbacks(ngtcp2_callbacks *cb, int is_server) {
  memset(cb, 0, sizeof(*cb));
  if (is_server) {
    cb->recv_client_initial = ngtcp2_crypto_recv_client_initial_cb;
    cb->recv_tx_key = cb_recv_tx_key;
  } else {
    cb->client_initial = ngtcp2_crypto_client_initial_cb;
    cb->recv_retry = ngtcp2_crypto_recv_retry_cb;
    cb->recv_rx_key = cb_recv_rx_key;
    cb->select_preferred_addr = cb_select_preferred_addr;
  }
  cb->path_validation = cb_path_validation;
  cb->recv_crypto_data = cb_recv_crypto_data;
  cb->handshake_completed = cb_handshake_completed;
  cb->handshake_confirmed = cb_handshake_confirmed;
  cb->encrypt = ngtcp2_crypto_encrypt_cb;
  cb->decrypt = cb_decrypt;
  cb->hp_mask = ngtcp2_crypto_hp_mask_cb;
  cb->recv_stream_data = cb_recv_stream_data;
  cb->acked_stream_data_offset = cb_acked_stream_data_offset;
  cb->stream_close = cb_stream_close;
  cb->rand = cb_rand;
  cb->get_new_connection_id = cb_get_new_connection_id;
  cb->remove_connection_id = cb_remove_connection_id;
  cb->update_key = ngtcp2_crypto_update_key_cb;
  cb->stream_reset = cb_stream_reset;
  cb->extend_max_remote_streams_bidi = cb_extend_max_remote_streams_bidi;
  cb->extend_max_stream_data = cb_extend_max_stream_data;
  cb->delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb;
  cb->delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb;
  cb->get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb;
  cb->stream_stop_sending = cb_stream_stop_sending;
  cb->version_negotiation = ngtcp2_crypto_version_negotiation_cb;
}

static void fill_settings(const stoq_endpoint_ctx *ep, ngtcp2_settings *st, ngtcp2_transport_params *p, uint64_t now) {
  const stoq_settings *s = &ep->s;
  ngtcp2_settings_default(st);
  st->initial_ts = now;
  st->cc_algo = (ngtcp2_cc_algo)s->cc_algo;
  if (s->max_window) st->max_window = s->max_window;
  if (s->max_stream_window) st->max_stream_window = s->max_stream_window;
  /* A stream's unwritten body never exceeds its window: keep that within the writer's ring. */
  if (ep->sink && st->max_stream_window > ep->sink_ring_bytes) st->max_stream_window = ep->sink_ring_bytes;
  if (s->handshake_timeout) st->handshake_timeout = s->handshake_timeout;
  if (s->ack_thresh) st->ack_thresh = s->ack_thresh;
  if (s->max_udp_payload_size) {
    /* Packets are this size from the first Initial (bounded only by the peer's
     * max_udp_payload_size), so Path MTU discovery could not raise it: its PING probes (1406
     * and 1452 bytes per connection, each way) would be sent for nothing. */
    st->max_tx_udp_payload_size = s->max_udp_payload_size;
    st->no_tx_udp_payload_size_shaping = 1;
    st->no_pmtud = 1;
  }
  if (s->log) st->log_printf = cb_log;

  ngtcp2_transport_params_default(p);
  uint64_t stream_data = s->initial_max_stream_data;
  if (ep->sink && stream_data > ep->sink_ring_bytes) stream_data = ep->sink_ring_bytes;
  p->initial_max_stream_data_bidi_local = stream_data;
  p->initial_max_stream_data_bidi_remote = stream_data;
  p->initial_max_stream_data_uni = stream_data;
  p->initial_max_data = s->initial_max_data;
  p->initial_max_streams_bidi = ep->is_server ? s->max_streams_bidi : 0;
  /* Never extended: ngtcp2 0.12 never closes a peer's unidirectional stream (fixed in 0.14,
   * "a remote uni stream never be closed"), so each holds its ngtcp2 and nghttp3 state until
   * the connection ends. Three are HTTP/3's own; a peer that opens more (reserved types) gets
   * five, and the rest wait, blocked, costing the node nothing. */
  p->initial_max_streams_uni = 8;
  p->max_idle_timeout = s->idle_timeout;
  p->active_connection_id_limit = 7;
}

int stoq_conn_peer_refused(const stoq_conn *c) { return c->peer_refused; }
int stoq_conn_peer_going_away(const stoq_conn *c) { return c->peer_going_away; }

const char *stoq_conn_peer_identity(const stoq_conn *c) { return c->peer_identity; }

static stoq_conn *conn_alloc(stoq_endpoint_ctx *ep, const struct sockaddr_in6 *local,
                             const struct sockaddr_in6 *remote) {
  stoq_conn *c = calloc(1, sizeof(*c));
  if (!c) return NULL;
  c->ep = ep;
  ep->refs++;
  c->is_server = ep->is_server;
  c->local = *local;
  c->remote = *remote;
  c->max_pkt = ep->s.max_udp_payload_size ? ep->s.max_udp_payload_size : 1452;
  if (c->max_pkt < NGTCP2_MAX_UDP_PAYLOAD_SIZE) c->max_pkt = NGTCP2_MAX_UDP_PAYLOAD_SIZE;
  c->pending = malloc(c->max_pkt);
  if (!c->pending) {
    free(c);
    return NULL;
  }
  ngtcp2_connection_close_error_default(&c->last_error);
  for (int i = 0; i < 3; i++) c->rx_largest[i] = -1;
  return c;
}

ngtcp2_path make_path(struct sockaddr_in6 *local, struct sockaddr_in6 *remote) {
  ngtcp2_path p = {
      .local = {.addr = (ngtcp2_sockaddr *)local, .addrlen = sizeof(*local)},
      .remote = {.addr = (ngtcp2_sockaddr *)remote, .addrlen = sizeof(*remote)},
      .user_data = NULL,
  };
  return p;
}

stoq_conn *stoq_conn_accept(stoq_endpoint_ctx *ep, const uint8_t *pkt, size_t len, const struct sockaddr_in6 *local,
                            const struct sockaddr_in6 *remote, uint64_t now, void *app, int retry, int may_reply,
                            uint8_t *out, size_t outcap, ssize_t *outlen, int *action) {
  *action = STOQ_ACCEPT_DROP;
  *outlen = 0;
  ngtcp2_pkt_hd hd;
  int rv = ngtcp2_accept(&hd, pkt, len);
  if (rv != 0 && rv != NGTCP2_ERR_RETRY) return NULL;
  /* A tokenless Initial is one the flood rule sees as such (its token length spelled 0x00, as
   * every client does), or none: one spelled longer would pass the kernel's shedding. */
  if (hd.type == NGTCP2_PKT_INITIAL && hd.token.len == 0 && !stoq_quic_sheddable_initial(pkt, pkt + len)) return NULL;
  /* A 0-RTT packet ahead of its Initial (reordered): ngtcp2 asks for a Retry. Without Retry
   * that would cost the client a round trip and a second connection; its data comes again
   * once the handshake is done, so the packet is dropped. */
  if (rv == NGTCP2_ERR_RETRY && !retry) return NULL;

  ngtcp2_cid odcid, *pocid = NULL;
  const uint8_t *token = NULL;
  size_t tokenlen = 0;
  /* With retry on, everything but a valid Retry token is answered with a Retry (a 0-RTT
   * packet ahead of its Initial, which ngtcp2 flags, included). */
  int need_retry = retry;

  if (hd.token.len > 0 && hd.token.base[0] == NGTCP2_CRYPTO_TOKEN_MAGIC_RETRY) {
    if (ngtcp2_crypto_verify_retry_token(&odcid, hd.token.base, hd.token.len, ep->s.static_secret, STOQ_SECRETLEN,
                                         hd.version, (const ngtcp2_sockaddr *)remote, sizeof(*remote), &hd.dcid,
                                         RETRY_TOKEN_TIMEOUT, now) != 0) {
      /* A forged or stale Retry token: tell the client plainly (INVALID_TOKEN), statelessly. */
      if (!may_reply) {
        *action = STOQ_ACCEPT_UNANSWERED;
        return NULL;
      }
      ssize_t n = ngtcp2_crypto_write_connection_close(out, outcap, hd.version, &hd.scid, &hd.dcid,
                                                       NGTCP2_INVALID_TOKEN, NULL, 0);
      if (n > 0) {
        *outlen = n;
        *action = STOQ_ACCEPT_INVALID_TOKEN;
      }
      return NULL;
    }
    pocid = &odcid;
    token = hd.token.base;
    tokenlen = hd.token.len;
    need_retry = 0;
  }

  if (need_retry) {
    if (!may_reply) {
      *action = STOQ_ACCEPT_UNANSWERED;
      return NULL;
    }
    if (outcap > len * 3) outcap = len * 3; /* stay inside the anti-amplification limit */
    ngtcp2_cid scid;
    make_cid(ep, &scid, STOQ_SCIDLEN);
    uint8_t tok[NGTCP2_CRYPTO_MAX_RETRY_TOKENLEN];
    ssize_t tl =
        ngtcp2_crypto_generate_retry_token(tok, ep->s.static_secret, STOQ_SECRETLEN, hd.version,
                                           (const ngtcp2_sockaddr *)remote, sizeof(*remote), &scid, &hd.dcid, now);
    if (tl < 0) return NULL;
    ssize_t n = ngtcp2_crypto_write_retry(out, outcap, hd.version, &hd.scid, &scid, &hd.dcid, tok, (size_t)tl);
    if (n > 0) {
      *outlen = n;
      *action = STOQ_ACCEPT_RETRY;
    }
    return NULL;
  }

  stoq_conn *c = conn_alloc(ep, local, remote);
  if (!c) return NULL;
  c->app = app;
  ngtcp2_callbacks cb;
  fill_callbacks(&cb, 1);
  ngtcp2_settings st;
  ngtcp2_transport_params p;
  fill_settings(ep, &st, &p, now);
  st.token = (ngtcp2_vec){(uint8_t *)(uintptr_t)token, tokenlen};
  ngtcp2_cid scid;
  make_cid(ep, &scid, STOQ_SCIDLEN);
  if (pocid) {
    p.original_dcid = *pocid;
    p.retry_scid = hd.dcid;
    p.retry_scid_present = 1;
  } else {
    p.original_dcid = hd.dcid;
  }
  p.stateless_reset_token_present = 1;
  ngtcp2_crypto_generate_stateless_reset_token(p.stateless_reset_token, ep->s.static_secret, STOQ_SECRETLEN, &scid);
  if (ep->s.preferred_address.sin6_family == AF_INET6) {
    /* Its CID is one of ours like any other (sequence 1): the worker byte steers packets to
     * this worker whichever address they arrive on, and on_cid puts it in the table below. */
    ngtcp2_preferred_addr *pa = &p.preferred_address;
    make_cid(ep, &pa->cid, STOQ_SCIDLEN);
    ngtcp2_crypto_generate_stateless_reset_token(pa->stateless_reset_token, ep->s.static_secret, STOQ_SECRETLEN,
                                                 &pa->cid);
    memcpy(&pa->ipv6, &ep->s.preferred_address, sizeof(pa->ipv6));
    pa->ipv6_present = 1;
    p.preferred_address_present = 1;
  }
  qlog_attach(c, &st, &p.original_dcid);
  ngtcp2_path path = make_path(&c->local, &c->remote);
  rv = ngtcp2_conn_server_new(&c->q, &hd.scid, &scid, &path, hd.version, &cb, &st, &p, &ep->ngtcp2_mem, c);
  if (rv != 0 || setup_tls(c, NULL) != 0) {
    stoq_conn_free(c);
    return NULL;
  }
  if (ep->ev.on_cid) {
    ep->ev.on_cid(ep->ev.ctx, c, hd.dcid.data, hd.dcid.datalen, 1);
    ep->ev.on_cid(ep->ev.ctx, c, scid.data, scid.datalen, 1);
    if (p.preferred_address_present)
      ep->ev.on_cid(ep->ev.ctx, c, p.preferred_address.cid.data, p.preferred_address.cid.datalen, 1);
  }
  *action = STOQ_ACCEPT_OK;
  return c;
}

stoq_conn *stoq_conn_connect(stoq_endpoint_ctx *ep, const char *server_name, const struct sockaddr_in6 *local,
                             const struct sockaddr_in6 *remote, uint64_t now, void *app, char *err, size_t errlen) {
  stoq_conn *c = conn_alloc(ep, local, remote);
  if (!c) {
    set_err(err, errlen, "out of memory");
    return NULL;
  }
  c->app = app;
  ngtcp2_callbacks cb;
  fill_callbacks(&cb, 0);
  ngtcp2_settings st;
  ngtcp2_transport_params p;
  fill_settings(ep, &st, &p, now);
  ngtcp2_cid dcid, scid;
  dcid.datalen = 18;
  stoq_random(dcid.data, dcid.datalen);
  make_cid(ep, &scid, STOQ_SCIDLEN);
  qlog_attach(c, &st, &dcid); /* a client's ODCID is the DCID it starts with */
  ngtcp2_path path = make_path(&c->local, &c->remote);
  int rv = ngtcp2_conn_client_new(&c->q, &dcid, &scid, &path, NGTCP2_PROTO_VER_V1, &cb, &st, &p, &ep->ngtcp2_mem, c);
  if (rv != 0) {
    set_err(err, errlen, "ngtcp2_conn_client_new: %s", ngtcp2_strerror(rv));
    stoq_conn_free(c);
    return NULL;
  }
  if (setup_tls(c, server_name) != 0) {
    set_err(err, errlen, "%s", c->errstr);
    stoq_conn_free(c);
    return NULL;
  }
  if (ep->ev.on_cid) ep->ev.on_cid(ep->ev.ctx, c, scid.data, scid.datalen, 1);
  return c;
}

void stoq_conn_end_streams(stoq_conn *c) {
  while (c->streams) stream_end(c, c->streams, STOQ_H3_REQUEST_CANCELLED);
}

void stoq_conn_free(stoq_conn *c) {
  if (!c) return;
  stoq_conn_end_streams(c);
  if (c->h3) nghttp3_conn_del(c->h3);
  if (c->q) ngtcp2_conn_del(c->q); /* writes the qlog's end */
  qlog_free(c);
  if (c->tls) gnutls_deinit(c->tls);
  gnutls_free(c->session.data);
  free(c->pending);
  endpoint_release(c->ep);
  free(c);
}

/* ---- 0-RTT (client) ----------------------------------------------------------- */

/* The limits a 0-RTT flight is held to (those ngtcp2_conn_set_early_remote_transport_params
 * reads), nothing of the old connection's identity: no CIDs, no reset token. */
static void early_limits(ngtcp2_transport_params *to, const ngtcp2_transport_params *from) {
  ngtcp2_transport_params_default(to);
  to->initial_max_streams_bidi = from->initial_max_streams_bidi;
  to->initial_max_streams_uni = from->initial_max_streams_uni;
  to->initial_max_stream_data_bidi_local = from->initial_max_stream_data_bidi_local;
  to->initial_max_stream_data_bidi_remote = from->initial_max_stream_data_bidi_remote;
  to->initial_max_stream_data_uni = from->initial_max_stream_data_uni;
  to->initial_max_data = from->initial_max_data;
  to->active_connection_id_limit = from->active_connection_id_limit;
  to->max_idle_timeout = from->max_idle_timeout;
  to->max_udp_payload_size = from->max_udp_payload_size;
  to->disable_active_migration = from->disable_active_migration;
  to->max_datagram_frame_size = from->max_datagram_frame_size;
}

ssize_t stoq_conn_early_params(stoq_conn *c, uint8_t *buf, size_t cap) {
  if (c->is_server || !c->established) return -1;
  const ngtcp2_transport_params *remote = ngtcp2_conn_get_remote_transport_params(c->q);
  if (!remote) return -1;
  ngtcp2_transport_params p;
  early_limits(&p, remote);
  ngtcp2_ssize n = ngtcp2_encode_transport_params(buf, cap, NGTCP2_TRANSPORT_PARAMS_TYPE_ENCRYPTED_EXTENSIONS, &p);
  return n < 0 ? -1 : (ssize_t)n;
}

int stoq_conn_set_early_params(stoq_conn *c, const uint8_t *data, size_t len) {
  if (c->is_server || !c->ep->s.early_data || !c->session_offered || c->h3 || c->early) return -1;
  ngtcp2_transport_params p, limits;
  if (ngtcp2_decode_transport_params(&p, NGTCP2_TRANSPORT_PARAMS_TYPE_ENCRYPTED_EXTENSIONS, data, len) != 0) return -1;
  /* HTTP/3 needs three unidirectional streams of its own, and a request a bidirectional one. */
  if (p.initial_max_streams_uni < 3 || p.initial_max_streams_bidi < 1 || p.initial_max_data == 0) return -1;
  early_limits(&limits, &p);
  ngtcp2_conn_set_early_remote_transport_params(c->q, &limits);
  if (setup_h3(c) != 0) return -1;
  c->early = 1;
  return 0;
}

int stoq_conn_early_data(const stoq_conn *c) { return c->is_server ? STOQ_EARLY_NONE : c->early_outcome; }

void stoq_conn_set_app(stoq_conn *c, void *app) { c->app = app; }
void *stoq_conn_get_app(const stoq_conn *c) { return c->app; }
int stoq_conn_is_established(const stoq_conn *c) { return c->established; }
int stoq_conn_is_confirmed(const stoq_conn *c) { return c->confirmed; }
int stoq_conn_refused_by_peer(const stoq_conn *c) { return c->refused_by_peer; }
uint64_t stoq_conn_bidi_streams_left(stoq_conn *c) { return ngtcp2_conn_get_streams_bidi_left(c->q); }
const char *stoq_conn_error_string(const stoq_conn *c) { return c->errstr; }

void stoq_conn_remote(const stoq_conn *c, struct sockaddr_in6 *out) {
  const ngtcp2_path *p = ngtcp2_conn_get_path(c->q);
  memcpy(out, p->remote.addr, sizeof(*out));
}

void stoq_conn_local(const stoq_conn *c, struct sockaddr_in6 *out) {
  const ngtcp2_path *p = ngtcp2_conn_get_path(c->q);
  memcpy(out, p->local.addr, sizeof(*out));
}

int stoq_conn_preferred_address_state(const stoq_conn *c) { return c->preferred; }
uint64_t stoq_conn_paths_validated(const stoq_conn *c) { return c->paths_validated; }
uint64_t stoq_conn_paths_failed(const stoq_conn *c) { return c->paths_failed; }

int stoq_conn_migrate(stoq_conn *c, const struct sockaddr_in6 *local, uint64_t now) {
  const ngtcp2_path *cur = ngtcp2_conn_get_path(c->q);
  struct sockaddr_in6 l = *local, r;
  memcpy(&r, cur->remote.addr, sizeof(r));
  ngtcp2_path path = make_path(&l, &r);
  c->pending_len = 0; /* a held packet names the old path: ngtcp2 sends again what it carried */
  return ngtcp2_conn_initiate_immediate_migration(c->q, &path, now);
}

void stoq_conn_get_stats(const stoq_conn *c, stoq_conn_stats *out) {
  ngtcp2_conn_stat st;
  ngtcp2_conn_get_conn_stat(c->q, &st);
  out->bytes_in_flight = st.bytes_in_flight;
  out->cwnd = st.cwnd;
  out->smoothed_rtt_ns = st.smoothed_rtt;
  out->rttvar_ns = st.rttvar;
  out->min_rtt_ns = st.min_rtt;
  out->body_bytes_received = c->body_rx;
  out->body_bytes_sent = c->body_tx;
  out->streams_open = c->streams_open;
}

uint64_t stoq_conn_ack_delay(const stoq_conn *c) {
  /* ngtcp2 0.12's conn_compute_ack_delay, which it does not export. */
  ngtcp2_conn_stat st;
  ngtcp2_conn_get_conn_stat(c->q, &st);
  uint64_t most = ngtcp2_conn_get_local_transport_params(c->q)->max_ack_delay;
  return st.smoothed_rtt / 8 < most ? st.smoothed_rtt / 8 : most;
}
