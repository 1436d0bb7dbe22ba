/*
 * One STOQ connection = ngtcp2 (QUIC) + GnuTLS (TLS 1.3) + nghttp3 (HTTP/3).
 * See include/CNgtcp2.h for why this shim exists and what it promises.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <nghttp3/nghttp3.h>
#include <ngtcp2/ngtcp2.h>
#include <ngtcp2/ngtcp2_crypto.h>
#include <ngtcp2/ngtcp2_crypto_gnutls.h>

/* How long a Retry token stays good. */
#define RETRY_TOKEN_TIMEOUT (10ull * NGTCP2_SECONDS)
/* How much response body one nghttp3 DATA frame carries. */
#define BODY_CHUNK (1u << 20)
/* How much received body is gathered before one pwrite. */
#define SINK_BUFFER (256u << 10)

int stoq_random(uint8_t *buf, size_t len) {
  return gnutls_rnd(GNUTLS_RND_RANDOM, buf, len) == 0 ? 0 : -1;
}

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

stoq_endpoint_ctx *stoq_endpoint_ctx_new(int is_server, stoq_tls_ctx *tls, const stoq_settings *s,
                                         const stoq_events *ev) {
  stoq_endpoint_ctx *ep = calloc(1, sizeof(*ep));
  if (!ep) return NULL;
  ep->is_server = is_server;
  ep->tls = tls;
  ep->s = *s;
  ep->ev = *ev;
  ep->refs = 1;
  return ep;
}

static void endpoint_release(stoq_endpoint_ctx *ep) {
  if (--ep->refs == 0) free(ep);
}

void stoq_endpoint_ctx_set_tls(stoq_endpoint_ctx *ep, stoq_tls_ctx *tls) { ep->tls = tls; }
void stoq_endpoint_ctx_free(stoq_endpoint_ctx *ep) {
  stoq_events none = {0};
  ep->ev = none; /* connections still alive call no one */
  ep->tls = NULL;
  endpoint_release(ep);
}

/* ---- Stateless packets ---------------------------------------------------- */

int stoq_pkt_decode_ids(const uint8_t *pkt, size_t len, size_t short_dcidlen, stoq_pkt_ids *out) {
  ngtcp2_version_cid vc;
  int rv = ngtcp2_pkt_decode_version_cid(&vc, pkt, len, short_dcidlen);
  if (rv != 0 && rv != NGTCP2_ERR_VERSION_NEGOTIATION) return STOQ_PKT_INVALID;
  if (vc.dcidlen > STOQ_MAX_CIDLEN) return STOQ_PKT_INVALID;
  out->version = vc.version;
  out->is_long = (pkt[0] & 0x80) != 0;
  out->dcidlen = vc.dcidlen;
  out->scidlen = vc.scidlen;
  if (vc.dcidlen) memcpy(out->dcid, vc.dcid, vc.dcidlen);
  if (vc.scidlen) memcpy(out->scid, vc.scid, vc.scidlen);
  return rv == NGTCP2_ERR_VERSION_NEGOTIATION ? STOQ_PKT_VERSION_NEGOTIATION : STOQ_PKT_OK;
}

ssize_t stoq_pkt_write_version_negotiation(uint8_t *buf, size_t cap, const stoq_pkt_ids *ids) {
  uint32_t sv[] = {NGTCP2_PROTO_VER_V1};
  uint8_t r;
  stoq_random(&r, 1);
  /* Our reply swaps the connection IDs. */
  return ngtcp2_pkt_write_version_negotiation(buf, cap, r, ids->scid, ids->scidlen, ids->dcid, ids->dcidlen, sv,
                                              sizeof(sv) / sizeof(sv[0]));
}

ssize_t stoq_pkt_write_stateless_reset(const stoq_endpoint_ctx *ep, uint8_t *buf, size_t cap, const uint8_t *dcid,
                                       size_t dcidlen, size_t received_len) {
  /* Smaller than what we got (so two endpoints cannot loop), and large enough to look like a packet. */
  if (received_len < NGTCP2_STATELESS_RESET_TOKENLEN + NGTCP2_MIN_STATELESS_RESET_RANDLEN + 2) return 0;
  size_t total = received_len - 1;
  if (total > 64) total = 64;
  if (total > cap) return -1;
  ngtcp2_cid cid;
  ngtcp2_cid_init(&cid, dcid, dcidlen);
  uint8_t token[NGTCP2_STATELESS_RESET_TOKENLEN];
  if (ngtcp2_crypto_generate_stateless_reset_token(token, ep->s.static_secret, STOQ_SECRETLEN, &cid) != 0) return -1;
  uint8_t rnd[64];
  size_t randlen = total - NGTCP2_STATELESS_RESET_TOKENLEN;
  stoq_random(rnd, randlen);
  return ngtcp2_pkt_write_stateless_reset(buf, cap, token, rnd, randlen);
}

/* ---- Streams --------------------------------------------------------------- */

static stoq_stream *stream_new(stoq_conn *c, int64_t id) {
  stoq_stream *s = calloc(1, sizeof(*s));
  if (!s) return NULL;
  s->id = id;
  s->conn = c;
  s->content_length = -1;
  s->max_age = -1;
  s->sink_fd = -1;
  s->sink_limit = UINT64_MAX;
  s->next = c->streams;
  if (c->streams) c->streams->prev = s;
  c->streams = s;
  c->streams_open++;
  return s;
}

static void sink_write(stoq_stream *s, const uint8_t *data, size_t len, uint64_t at) {
  size_t off = 0;
  while (off < len && !s->sink_errno) {
    ssize_t n = pwrite(s->sink_fd, data + off, len - off, (off_t)(at + off));
    if (n < 0) {
      if (errno == EINTR) continue;
      s->sink_errno = errno;
      break;
    }
    off += (size_t)n;
  }
}

/* Writes what is staged; the staged bytes end at s->received. */
static void sink_flush(stoq_stream *s) {
  if (s->wlen && s->sink_fd >= 0) sink_write(s, s->wbuf, s->wlen, s->sink_off + s->received - s->wlen);
  s->wlen = 0;
}

static void stream_free(stoq_conn *c, stoq_stream *s) {
  sink_flush(s);
  free(s->wbuf);
  if (s->prev) s->prev->next = s->next;
  else c->streams = s->next;
  if (s->next) s->next->prev = s->prev;
  for (unsigned i = 0; i < s->p_count; i++) {
    struct body_piece *p = &s->pieces[(s->p_head + i) % STOQ_BODY_PIECES];
    if (p->release) p->release(p->arg);
  }
  if (s->hashing && !s->digest_done) gnutls_hash_deinit(s->hash, NULL);
  c->streams_open--;
  free(s);
}

void stoq_stream_set_app(stoq_stream *s, void *app) { s->app = app; }
void *stoq_stream_get_app(const stoq_stream *s) { return s->app; }
int64_t stoq_stream_id(const stoq_stream *s) { return s->id; }
uint64_t stoq_stream_received(const stoq_stream *s) { return s->received; }
int stoq_stream_sink_errno(const stoq_stream *s) { return s->sink_errno; }
int stoq_stream_body_complete(const stoq_stream *s) { return s->body_complete; }
int64_t stoq_stream_max_age(const stoq_stream *s) { return s->max_age; }

void stoq_stream_set_sink(stoq_stream *s, int fd, uint64_t offset, uint64_t limit, int hash) {
  sink_flush(s);
  s->sink_fd = fd;
  if (fd >= 0 && !s->wbuf) s->wbuf = malloc(SINK_BUFFER);
  s->sink_off = offset;
  s->sink_limit = limit;
  if (hash && !s->hashing) {
    if (gnutls_hash_init(&s->hash, GNUTLS_DIG_SHA256) == 0) s->hashing = 1;
  }
}

int stoq_stream_body_sha256(stoq_stream *s, uint8_t out[32]) {
  if (!s->digest_done) return -1;
  memcpy(out, s->digest, 32);
  return 0;
}

static void stream_finish_digest(stoq_stream *s) {
  if (s->hashing && !s->digest_done) {
    gnutls_hash_deinit(s->hash, s->digest);
    s->digest_done = 1;
  }
}

/* ---- nghttp3 glue ----------------------------------------------------------- */

static void consume(stoq_conn *c, int64_t stream_id, size_t n) {
  ngtcp2_conn_extend_max_stream_offset(c->q, stream_id, n);
  ngtcp2_conn_extend_max_offset(c->q, n);
}

static int h3_acked_stream_data(nghttp3_conn *h3, int64_t stream_id, uint64_t datalen, void *ud, void *sud) {
  (void)ud;
  stoq_stream *s = sud;
  /* Each piece goes back once the peer has acknowledged all of it (acks arrive in order:
   * nghttp3 counts them). */
  if (!s) return 0;
  s->p_acked += datalen;
  while (s->p_count && s->p_read > 0) {
    struct body_piece *p = &s->pieces[s->p_head];
    if (s->p_acked < p->len) break;
    s->p_acked -= p->len;
    if (p->release) p->release(p->arg);
    p->release = NULL;
    s->p_head = (s->p_head + 1) % STOQ_BODY_PIECES;
    s->p_count--;
    s->p_read--;
  }
  /* A stream that blocked because every piece slot was taken can ask for more now. */
  if (s->stream_blocked && s->p_count < STOQ_BODY_PIECES && !s->stream_eof) {
    s->stream_blocked = 0;
    nghttp3_conn_resume_stream(h3, stream_id);
  }
  return 0;
}

static int h3_stream_close(nghttp3_conn *h3, int64_t stream_id, uint64_t app_error_code, void *ud, void *sud) {
  (void)h3;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (s) {
    if (c->ep->ev.on_stream_close) c->ep->ev.on_stream_close(c->ep->ev.ctx, c, s, app_error_code);
    stream_free(c, s);
  }
  if (c->is_server && ngtcp2_is_bidi_stream(stream_id)) ngtcp2_conn_extend_max_streams_bidi(c->q, 1);
  return 0;
}

static int h3_recv_data(nghttp3_conn *h3, int64_t stream_id, const uint8_t *data, size_t len, void *ud, void *sud) {
  (void)h3;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  consume(c, stream_id, len);
  if (!s) return 0;
  if (s->received + len > s->sink_limit) {
    /* More body than allowed: refuse the rest of the stream, keep the connection. */
    ngtcp2_conn_shutdown_stream(c->q, stream_id, STOQ_H3_EXCESSIVE_LOAD);
    s->sink_errno = EFBIG;
    return 0;
  }
  if (s->sink_fd >= 0 && !s->sink_errno) {
    if (!s->wbuf || len >= SINK_BUFFER) {
      sink_flush(s);
      sink_write(s, data, len, s->sink_off + s->received);
    } else {
      if (s->wlen + len > SINK_BUFFER) sink_flush(s);
      memcpy(s->wbuf + s->wlen, data, len);
      s->wlen += len;
    }
  }
  if (s->hashing) gnutls_hash(s->hash, data, len);
  s->received += len;
  c->body_rx += len;
  return 0;
}

static int h3_deferred_consume(nghttp3_conn *h3, int64_t stream_id, size_t n, void *ud, void *sud) {
  (void)h3; (void)sud;
  consume(ud, stream_id, n);
  return 0;
}

static int h3_begin_headers(nghttp3_conn *h3, int64_t stream_id, void *ud, void *sud) {
  stoq_conn *c = ud;
  if (sud) return 0;
  if (!c->is_server) return 0;
  stoq_stream *s = stream_new(c, stream_id);
  if (!s) return NGHTTP3_ERR_NOMEM;
  nghttp3_conn_set_stream_user_data(h3, stream_id, s);
  return 0;
}

static void copy_field(char *dst, size_t cap, nghttp3_rcbuf *v, int *truncated) {
  nghttp3_vec b = nghttp3_rcbuf_get_buf(v);
  size_t n = b.len;
  if (n >= cap) {
    n = cap - 1;
    if (truncated) *truncated = 1;
  }
  memcpy(dst, b.base, n);
  dst[n] = 0;
}

static int h3_recv_header(nghttp3_conn *h3, int64_t stream_id, int32_t token, nghttp3_rcbuf *name,
                          nghttp3_rcbuf *value, uint8_t flags, void *ud, void *sud) {
  (void)h3; (void)stream_id; (void)name; (void)flags; (void)ud;
  stoq_stream *s = sud;
  if (!s) return 0;
  /* RFC 9114 §4.2.2 counts name + value + 32 per field. */
  s->header_bytes += nghttp3_rcbuf_get_buf(name).len + nghttp3_rcbuf_get_buf(value).len + 32;
  switch (token) {
  case NGHTTP3_QPACK_TOKEN__METHOD:
    s->dup_pseudo |= s->have_method;
    s->have_method = 1;
    copy_field(s->method, sizeof(s->method), value, &s->dup_pseudo);
    break;
  case NGHTTP3_QPACK_TOKEN__PATH:
    s->dup_pseudo |= s->have_path;
    s->have_path = 1;
    copy_field(s->path, sizeof(s->path), value, &s->path_too_long);
    break;
  case NGHTTP3_QPACK_TOKEN__SCHEME:
    s->have_scheme = 1;
    break;
  case NGHTTP3_QPACK_TOKEN__AUTHORITY:
    s->have_authority = 1;
    copy_field(s->authority, sizeof(s->authority), value, NULL);
    break;
  case NGHTTP3_QPACK_TOKEN_RANGE:
    copy_field(s->range, sizeof(s->range), value, NULL);
    break;
  case NGHTTP3_QPACK_TOKEN__STATUS: {
    char tmp[8];
    copy_field(tmp, sizeof(tmp), value, NULL);
    s->status = atoi(tmp);
    break;
  }
  case NGHTTP3_QPACK_TOKEN_CACHE_CONTROL: {
    /* Only max-age matters to STOQ (an edge node's freshness for what an origin sent). */
    char tmp[128];
    copy_field(tmp, sizeof(tmp), value, NULL);
    const char *m = strstr(tmp, "max-age=");
    if (m) {
      char *end = NULL;
      unsigned long long v = strtoull(m + 8, &end, 10);
      if (end != m + 8) s->max_age = v > INT64_MAX ? INT64_MAX : (int64_t)v;
    }
    break;
  }
  case NGHTTP3_QPACK_TOKEN_CONTENT_LENGTH: {
    char tmp[24];
    copy_field(tmp, sizeof(tmp), value, NULL);
    char *end = NULL;
    unsigned long long v = strtoull(tmp, &end, 10);
    if (end && *end == 0 && tmp[0] != 0) s->content_length = (int64_t)v;
    break;
  }
  default:
    break;
  }
  return 0;
}

static int h3_end_headers(nghttp3_conn *h3, int64_t stream_id, int fin, void *ud, void *sud) {
  (void)h3; (void)stream_id;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s) return 0;
  s->fin_with_headers = fin;
  if (c->is_server) {
    stoq_request req = {
        .method = s->method,
        .path = s->path,
        .authority = s->authority,
        .range = s->range,
        .content_length = s->content_length,
        .path_too_long = s->path_too_long,
        .malformed = s->dup_pseudo || !s->have_method || !s->have_path || !s->have_scheme,
        .has_body = !fin,
        .headers_too_large = s->header_bytes > STOQ_MAX_FIELD_SECTION,
    };
    if (c->ep->ev.on_request) c->ep->ev.on_request(c->ep->ev.ctx, c, s, &req);
  } else {
    if (c->ep->ev.on_response) c->ep->ev.on_response(c->ep->ev.ctx, c, s, s->status, s->content_length);
  }
  return 0;
}

static int h3_end_stream(nghttp3_conn *h3, int64_t stream_id, void *ud, void *sud) {
  (void)h3; (void)stream_id;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s) return 0;
  s->body_complete = 1;
  sink_flush(s);
  stream_finish_digest(s);
  if (c->is_server && c->ep->ev.on_request_end) c->ep->ev.on_request_end(c->ep->ev.ctx, c, s, 0);
  return 0;
}

static int h3_stop_sending(nghttp3_conn *h3, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)h3; (void)sud;
  stoq_conn *c = ud;
  return ngtcp2_conn_shutdown_stream_read(c->q, stream_id, code) == 0 ? 0 : NGHTTP3_ERR_CALLBACK_FAILURE;
}

static int h3_reset_stream(nghttp3_conn *h3, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)h3; (void)sud;
  stoq_conn *c = ud;
  return ngtcp2_conn_shutdown_stream_write(c->q, stream_id, code) == 0 ? 0 : NGHTTP3_ERR_CALLBACK_FAILURE;
}

static int setup_h3(stoq_conn *c) {
  if (c->h3) return 0;
  if (ngtcp2_conn_get_max_local_streams_uni(c->q) < 3) {
    conn_fail(c, "peer allows fewer than 3 unidirectional streams");
    return -1;
  }
  nghttp3_callbacks cb = {
      .acked_stream_data = h3_acked_stream_data,
      .stream_close = h3_stream_close,
      .recv_data = h3_recv_data,
      .deferred_consume = h3_deferred_consume,
      .begin_headers = h3_begin_headers,
      .recv_header = h3_recv_header,
      .end_headers = h3_end_headers,
      .stop_sending = h3_stop_sending,
      .end_stream = h3_end_stream,
      .reset_stream = h3_reset_stream,
  };
  nghttp3_settings st;
  nghttp3_settings_default(&st);
  st.qpack_max_dtable_capacity = 4096;
  st.qpack_blocked_streams = 100;
  st.max_field_section_size = 16384 + STOQ_MAX_PATH;
  int rv = c->is_server ? nghttp3_conn_server_new(&c->h3, &cb, &st, nghttp3_mem_default(), c)
                        : nghttp3_conn_client_new(&c->h3, &cb, &st, nghttp3_mem_default(), c);
  if (rv != 0) {
    conn_fail(c, "nghttp3 conn: %s", nghttp3_strerror(rv));
    return -1;
  }
  if (c->is_server) {
    const ngtcp2_transport_params *p = ngtcp2_conn_get_local_transport_params(c->q);
    nghttp3_conn_set_max_client_streams_bidi(c->h3, p->initial_max_streams_bidi);
  }
  int64_t ctrl, enc, dec;
  if ((rv = ngtcp2_conn_open_uni_stream(c->q, &ctrl, NULL)) != 0 ||
      (rv = ngtcp2_conn_open_uni_stream(c->q, &enc, NULL)) != 0 ||
      (rv = ngtcp2_conn_open_uni_stream(c->q, &dec, NULL)) != 0) {
    conn_fail(c, "opening HTTP/3 streams: %s", ngtcp2_strerror(rv));
    return -1;
  }
  if ((rv = nghttp3_conn_bind_control_stream(c->h3, ctrl)) != 0 ||
      (rv = nghttp3_conn_bind_qpack_streams(c->h3, enc, dec)) != 0) {
    conn_fail(c, "binding HTTP/3 streams: %s", nghttp3_strerror(rv));
    return -1;
  }
  return 0;
}

/* nghttp3 wants body bytes: the next slice of the current piece. A streamed body that has
 * sent every piece it holds asks the application for more first; with no room or nothing
 * yet, the stream waits (resumed by an append or by acks that free a slot). */
static nghttp3_ssize body_read(nghttp3_conn *h3, int64_t stream_id, nghttp3_vec *vec, size_t veccnt,
                               uint32_t *pflags, void *ud, void *sud) {
  (void)h3; (void)stream_id; (void)veccnt;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (s->p_read == s->p_count && !s->stream_eof && s->p_count < STOQ_BODY_PIECES && c->ep->ev.on_body_wanted)
    c->ep->ev.on_body_wanted(c->ep->ev.ctx, c, s); /* may append right here */
  /* Skip empty pieces (an empty last piece carries only the end of the body). */
  while (s->p_read < s->p_count && s->pieces[(s->p_head + s->p_read) % STOQ_BODY_PIECES].len == 0) s->p_read++;
  if (s->p_read == s->p_count) {
    if (s->stream_eof) {
      *pflags |= NGHTTP3_DATA_FLAG_EOF;
      return 0;
    }
    s->stream_blocked = 1;
    return NGHTTP3_ERR_WOULDBLOCK;
  }
  struct body_piece *p = &s->pieces[(s->p_head + s->p_read) % STOQ_BODY_PIECES];
  uint64_t left = p->len - s->p_read_off;
  size_t n = left > BODY_CHUNK ? BODY_CHUNK : (size_t)left;
  vec[0].base = (uint8_t *)(uintptr_t)(p->base + s->p_read_off);
  vec[0].len = n;
  s->p_read_off += n;
  c->body_tx += n;
  if (s->p_read_off == p->len) {
    s->p_read++;
    s->p_read_off = 0;
  }
  if (s->p_read == s->p_count && s->stream_eof) *pflags |= NGHTTP3_DATA_FLAG_EOF;
  return 1;
}

/* A whole-region body: one piece that ends it (released when acknowledged, or at close). */
static void set_whole_body(stoq_stream *s, const uint8_t *body, uint64_t len, void (*release)(void *), void *arg) {
  s->pieces[0] = (struct body_piece){.base = body, .len = len, .release = release, .arg = arg};
  s->p_head = 0;
  s->p_count = 1;
  s->stream_eof = 1;
}

#define MAX_NV 24

static size_t build_nv(nghttp3_nv *nva, size_t at, const stoq_header *hdrs, size_t nhdrs) {
  for (size_t i = 0; i < nhdrs && at < MAX_NV; i++, at++) {
    nva[at].name = (uint8_t *)(uintptr_t)hdrs[i].name;
    nva[at].namelen = strlen(hdrs[i].name);
    nva[at].value = (uint8_t *)(uintptr_t)hdrs[i].value;
    nva[at].valuelen = strlen(hdrs[i].value);
    nva[at].flags = NGHTTP3_NV_FLAG_NONE;
  }
  return at;
}

static nghttp3_nv make_nv(const char *n, const char *v) {
  nghttp3_nv nv = {(uint8_t *)(uintptr_t)n, (uint8_t *)(uintptr_t)v, strlen(n), strlen(v), NGHTTP3_NV_FLAG_NONE};
  return nv;
}

int stoq_stream_respond_streamed(stoq_conn *c, stoq_stream *s, int status, const stoq_header *hdrs, size_t nhdrs) {
  if (s->responded) return NGHTTP3_ERR_INVALID_STATE;
  char st[8];
  snprintf(st, sizeof(st), "%d", status);
  nghttp3_nv nva[MAX_NV];
  nva[0] = make_nv(":status", st);
  nva[1] = make_nv("server", "stoq");
  size_t n = build_nv(nva, 2, hdrs, nhdrs);
  nghttp3_data_reader dr = {.read_data = body_read};
  int rv = nghttp3_conn_submit_response(c->h3, s->id, nva, n, &dr);
  if (rv == 0) s->responded = 1;
  return rv;
}

int stoq_stream_body_append(stoq_conn *c, stoq_stream *s, const uint8_t *base, uint64_t len, int eof,
                            void (*release)(void *), void *arg) {
  if (!s->responded || s->stream_eof || s->p_count == STOQ_BODY_PIECES) return -1;
  struct body_piece *p = &s->pieces[(s->p_head + s->p_count) % STOQ_BODY_PIECES];
  p->base = base;
  p->len = len;
  p->release = release;
  p->arg = arg;
  s->p_count++;
  if (eof) s->stream_eof = 1;
  if (s->stream_blocked) {
    s->stream_blocked = 0;
    nghttp3_conn_resume_stream(c->h3, s->id);
  }
  return 0;
}

int stoq_stream_respond(stoq_conn *c, stoq_stream *s, int status, const stoq_header *hdrs, size_t nhdrs,
                        const uint8_t *body, uint64_t body_len, int has_body, void (*release)(void *), void *arg) {
  if (s->responded) return NGHTTP3_ERR_INVALID_STATE; /* one response per request */
  char st[8];
  snprintf(st, sizeof(st), "%d", status);
  nghttp3_nv nva[MAX_NV];
  nva[0] = make_nv(":status", st);
  nva[1] = make_nv("server", "stoq");
  size_t n = build_nv(nva, 2, hdrs, nhdrs);
  set_whole_body(s, body, body_len, release, arg);
  nghttp3_data_reader dr = {.read_data = body_read};
  int rv = nghttp3_conn_submit_response(c->h3, s->id, nva, n, has_body && body_len > 0 ? &dr : NULL);
  if (rv == 0) s->responded = 1;
  return rv;
}

stoq_stream *stoq_conn_submit_request(stoq_conn *c, const char *method, const char *authority, const char *path,
                                      const stoq_header *hdrs, size_t nhdrs, const uint8_t *body, uint64_t body_len,
                                      int has_body, void (*release)(void *), void *arg, void *app, char *err,
                                      size_t errlen) {
  if (!c->h3) {
    set_err(err, errlen, "the connection is not established");
    return NULL;
  }
  int64_t sid;
  int rv = ngtcp2_conn_open_bidi_stream(c->q, &sid, NULL);
  if (rv != 0) {
    set_err(err, errlen, "no stream available: %s", ngtcp2_strerror(rv));
    return NULL;
  }
  stoq_stream *s = stream_new(c, sid);
  if (!s) return NULL;
  s->app = app;
  set_whole_body(s, body, body_len, release, arg);
  nghttp3_nv nva[MAX_NV];
  nva[0] = make_nv(":method", method);
  nva[1] = make_nv(":scheme", "https");
  nva[2] = make_nv(":authority", authority);
  nva[3] = make_nv(":path", path);
  nva[4] = make_nv("user-agent", "stoq");
  size_t n = build_nv(nva, 5, hdrs, nhdrs);
  nghttp3_data_reader dr = {.read_data = body_read};
  rv = nghttp3_conn_submit_request(c->h3, sid, nva, n, has_body && body_len > 0 ? &dr : NULL, s);
  if (rv != 0) {
    set_err(err, errlen, "nghttp3_conn_submit_request: %s", nghttp3_strerror(rv));
    s->pieces[0].release = NULL; /* the caller keeps ownership on failure */
    stream_free(c, s);
    return NULL;
  }
  return s;
}

void stoq_stream_reset(stoq_conn *c, stoq_stream *s, uint64_t code) {
  ngtcp2_conn_shutdown_stream(c->q, s->id, code);
}

/* ---- ngtcp2 callbacks -------------------------------------------------------- */

static void cb_rand(uint8_t *dest, size_t len, const ngtcp2_rand_ctx *ctx) {
  (void)ctx;
  stoq_random(dest, len);
}

static void make_cid(const stoq_endpoint_ctx *ep, ngtcp2_cid *cid, size_t len) {
  cid->datalen = len;
  stoq_random(cid->data, len);
  cid->data[0] = ep->s.worker_id;
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

static int cb_recv_stream_data(ngtcp2_conn *q, uint32_t flags, int64_t stream_id, uint64_t offset,
                               const uint8_t *data, size_t len, void *ud, void *sud) {
  (void)q; (void)offset; (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  nghttp3_ssize n = nghttp3_conn_read_stream(c->h3, stream_id, data, len, flags & NGTCP2_STREAM_DATA_FLAG_FIN);
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
  (void)q; (void)offset; (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  return nghttp3_conn_add_ack_offset(c->h3, stream_id, len) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_stream_close(ngtcp2_conn *q, uint32_t flags, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)q; (void)sud;
  stoq_conn *c = ud;
  if (!(flags & NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET)) code = NGHTTP3_H3_NO_ERROR;
  if (!c->h3) return 0;
  int rv = nghttp3_conn_close_stream(c->h3, stream_id, code);
  if (rv != 0 && rv != NGHTTP3_ERR_STREAM_NOT_FOUND) {
    ngtcp2_connection_close_error_set_application_error(&c->last_error, nghttp3_err_infer_quic_app_error_code(rv),
                                                        NULL, 0);
    c->has_error = 1;
    return NGTCP2_ERR_CALLBACK_FAILURE;
  }
  return 0;
}

static int cb_stream_reset(ngtcp2_conn *q, int64_t stream_id, uint64_t final_size, uint64_t code, void *ud,
                           void *sud) {
  (void)q; (void)final_size; (void)code; (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  return nghttp3_conn_shutdown_stream_read(c->h3, stream_id) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_stream_stop_sending(ngtcp2_conn *q, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)q; (void)code; (void)sud;
  stoq_conn *c = ud;
  if (!c->h3) return 0;
  return nghttp3_conn_shutdown_stream_read(c->h3, stream_id) == 0 ? 0 : NGTCP2_ERR_CALLBACK_FAILURE;
}

static int cb_extend_max_stream_data(ngtcp2_conn *q, int64_t stream_id, uint64_t max_data, void *ud, void *sud) {
  (void)q; (void)max_data; (void)sud;
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

static int cb_handshake_completed(ngtcp2_conn *q, void *ud) {
  (void)q;
  stoq_conn *c = ud;
  c->established = 1;
  if (c->ep->ev.on_handshake) c->ep->ev.on_handshake(c->ep->ev.ctx, c);
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

static void fill_callbacks(ngtcp2_callbacks *cb, int is_server) {
  memset(cb, 0, sizeof(*cb));
  if (is_server) {
    cb->recv_client_initial = ngtcp2_crypto_recv_client_initial_cb;
    cb->recv_tx_key = cb_recv_tx_key;
  } else {
    cb->client_initial = ngtcp2_crypto_client_initial_cb;
    cb->recv_retry = ngtcp2_crypto_recv_retry_cb;
    cb->recv_rx_key = cb_recv_rx_key;
  }
  cb->recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb;
  cb->handshake_completed = cb_handshake_completed;
  cb->encrypt = ngtcp2_crypto_encrypt_cb;
  cb->decrypt = ngtcp2_crypto_decrypt_cb;
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
  if (s->handshake_timeout) st->handshake_timeout = s->handshake_timeout;
  if (s->ack_thresh) st->ack_thresh = s->ack_thresh;
  if (s->max_udp_payload_size) {
    st->max_tx_udp_payload_size = s->max_udp_payload_size;
    st->no_tx_udp_payload_size_shaping = 1;
  }
  if (s->log) st->log_printf = cb_log;

  ngtcp2_transport_params_default(p);
  p->initial_max_stream_data_bidi_local = s->initial_max_stream_data;
  p->initial_max_stream_data_bidi_remote = s->initial_max_stream_data;
  p->initial_max_stream_data_uni = s->initial_max_stream_data;
  p->initial_max_data = s->initial_max_data;
  p->initial_max_streams_bidi = ep->is_server ? s->max_streams_bidi : 0;
  p->initial_max_streams_uni = 8;
  p->max_idle_timeout = s->idle_timeout;
  p->active_connection_id_limit = 7;
}

int stoq_conn_peer_refused(const stoq_conn *c) { return c->peer_refused; }

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
  return c;
}

static ngtcp2_path make_path(struct sockaddr_in6 *local, struct sockaddr_in6 *remote) {
  ngtcp2_path p = {
      .local = {.addr = (ngtcp2_sockaddr *)local, .addrlen = sizeof(*local)},
      .remote = {.addr = (ngtcp2_sockaddr *)remote, .addrlen = sizeof(*remote)},
      .user_data = NULL,
  };
  return p;
}

stoq_conn *stoq_conn_accept(stoq_endpoint_ctx *ep, const uint8_t *pkt, size_t len,
                            const struct sockaddr_in6 *local, const struct sockaddr_in6 *remote, uint64_t now,
                            void *app, uint8_t *out, size_t outcap, ssize_t *outlen, int *action) {
  *action = STOQ_ACCEPT_DROP;
  *outlen = 0;
  ngtcp2_pkt_hd hd;
  int rv = ngtcp2_accept(&hd, pkt, len);
  if (rv != 0 && rv != NGTCP2_ERR_RETRY) return NULL;

  ngtcp2_cid odcid, *pocid = NULL;
  const uint8_t *token = NULL;
  size_t tokenlen = 0;
  int need_retry = rv == NGTCP2_ERR_RETRY;

  if (hd.token.len > 0 && hd.token.base[0] == NGTCP2_CRYPTO_TOKEN_MAGIC_RETRY) {
    if (ngtcp2_crypto_verify_retry_token(&odcid, hd.token.base, hd.token.len, ep->s.static_secret, STOQ_SECRETLEN,
                                         hd.version, (const ngtcp2_sockaddr *)remote, sizeof(*remote), &hd.dcid,
                                         RETRY_TOKEN_TIMEOUT, now) != 0) {
      /* A forged or stale Retry token: tell the client plainly (INVALID_TOKEN), statelessly. */
      ssize_t n = ngtcp2_crypto_write_connection_close(out, outcap, hd.version, &hd.scid, &hd.dcid,
                                                       NGTCP2_INVALID_TOKEN, NULL, 0);
      if (n > 0) {
        *outlen = n;
        *action = STOQ_ACCEPT_REPLY;
      }
      return NULL;
    }
    pocid = &odcid;
    token = hd.token.base;
    tokenlen = hd.token.len;
    need_retry = 0;
  } else if (ep->s.enable_retry) {
    need_retry = 1;
  }

  if (need_retry) {
    if (outcap > len * 3) outcap = len * 3; /* stay inside the anti-amplification limit */
    ngtcp2_cid scid;
    make_cid(ep, &scid, STOQ_SCIDLEN);
    uint8_t tok[NGTCP2_CRYPTO_MAX_RETRY_TOKENLEN];
    ssize_t tl = ngtcp2_crypto_generate_retry_token(tok, ep->s.static_secret, STOQ_SECRETLEN, hd.version,
                                                    (const ngtcp2_sockaddr *)remote, sizeof(*remote), &scid,
                                                    &hd.dcid, now);
    if (tl < 0) return NULL;
    ssize_t n = ngtcp2_crypto_write_retry(out, outcap, hd.version, &hd.scid, &scid, &hd.dcid, tok, (size_t)tl);
    if (n > 0) {
      *outlen = n;
      *action = STOQ_ACCEPT_REPLY;
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
  ngtcp2_path path = make_path(&c->local, &c->remote);
  rv = ngtcp2_conn_server_new(&c->q, &hd.scid, &scid, &path, hd.version, &cb, &st, &p, NULL, c);
  if (rv != 0 || setup_tls(c, NULL) != 0) {
    stoq_conn_free(c);
    return NULL;
  }
  if (ep->ev.on_cid) {
    ep->ev.on_cid(ep->ev.ctx, c, hd.dcid.data, hd.dcid.datalen, 1);
    ep->ev.on_cid(ep->ev.ctx, c, scid.data, scid.datalen, 1);
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
  ngtcp2_path path = make_path(&c->local, &c->remote);
  int rv = ngtcp2_conn_client_new(&c->q, &dcid, &scid, &path, NGTCP2_PROTO_VER_V1, &cb, &st, &p, NULL, c);
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

void stoq_conn_free(stoq_conn *c) {
  if (!c) return;
  while (c->streams) {
    stoq_stream *s = c->streams;
    if (c->ep->ev.on_stream_close) c->ep->ev.on_stream_close(c->ep->ev.ctx, c, s, STOQ_H3_REQUEST_CANCELLED);
    stream_free(c, s);
  }
  if (c->h3) nghttp3_conn_del(c->h3);
  if (c->q) ngtcp2_conn_del(c->q);
  if (c->tls) gnutls_deinit(c->tls);
  free(c->pending);
  endpoint_release(c->ep);
  free(c);
}

static int map_error(stoq_conn *c, int rv) {
  switch (rv) {
  case 0:
    return STOQ_CONN_OK;
  case NGTCP2_ERR_DRAINING:
  case NGTCP2_ERR_CLOSING:
    return STOQ_CONN_DRAINING;
  case NGTCP2_ERR_DROP_CONN:
  case NGTCP2_ERR_IDLE_CLOSE:
  case NGTCP2_ERR_HANDSHAKE_TIMEOUT:
  case NGTCP2_ERR_RETRY:
    conn_fail(c, "%s", ngtcp2_strerror(rv));
    return STOQ_CONN_DROP;
  case NGTCP2_ERR_CRYPTO:
    if (!c->has_error) {
      ngtcp2_connection_close_error_set_transport_error_tls_alert(&c->last_error, ngtcp2_conn_get_tls_alert(c->q),
                                                                  NULL, 0);
      c->has_error = 1;
    }
    if (!c->errstr[0] && c->is_server && c->tls_ctx && c->tls_ctx->client_auth == STOQ_CLIENT_AUTH_REQUIRED) {
      /* GnuTLS ends the handshake itself when a required certificate is missing. */
      unsigned n = 0;
      if (!gnutls_certificate_get_peers(c->tls, &n) || n == 0) refuse_peer(c, "none was presented");
    }
    if (!c->errstr[0]) {
      unsigned status = gnutls_session_get_verify_cert_status(c->tls);
      gnutls_datum_t out = {0};
      if (status && gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
        conn_fail(c, "TLS handshake failed: peer certificate refused: %s", out.data);
        gnutls_free(out.data);
      } else {
        conn_fail(c, "TLS handshake failed (alert %u)", ngtcp2_conn_get_tls_alert(c->q));
      }
    }
    return STOQ_CONN_CLOSE;
  default:
    if (!c->has_error) {
      ngtcp2_connection_close_error_set_transport_error_liberr(&c->last_error, rv, NULL, 0);
      c->has_error = 1;
    }
    if (!c->errstr[0]) conn_fail(c, "%s", ngtcp2_strerror(rv));
    return STOQ_CONN_CLOSE;
  }
}

int stoq_conn_read(stoq_conn *c, const uint8_t *pkt, size_t len, uint8_t ecn, const struct sockaddr_in6 *local,
                   const struct sockaddr_in6 *remote, uint64_t now) {
  struct sockaddr_in6 l = *local, r = *remote;
  ngtcp2_path path = make_path(&l, &r);
  ngtcp2_pkt_info pi = {.ecn = ecn};
  return map_error(c, ngtcp2_conn_read_pkt(c->q, &path, &pi, pkt, len, now));
}

static int same_addr(const struct sockaddr_in6 *a, const struct sockaddr *b) {
  const struct sockaddr_in6 *b6 = (const struct sockaddr_in6 *)b;
  return b6->sin6_family == AF_INET6 && a->sin6_port == b6->sin6_port &&
         memcmp(&a->sin6_addr, &b6->sin6_addr, 16) == 0;
}

ssize_t stoq_conn_write(stoq_conn *c, uint8_t *buf, size_t cap, size_t max_pkts, size_t stride,
                        size_t *segment_size, struct sockaddr_in6 *remote, uint8_t *ecn, uint64_t now) {
  *segment_size = 0;
  if (ngtcp2_conn_is_in_closing_period(c->q) || ngtcp2_conn_is_in_draining_period(c->q)) return 0;

  if (c->pending_len) {
    /* A packet that could not join the previous run goes out alone, first. */
    if (cap < c->pending_len) return 0;
    memcpy(buf, c->pending, c->pending_len);
    *segment_size = c->pending_len;
    *remote = c->pending_remote;
    *ecn = c->pending_ecn;
    ssize_t n = (ssize_t)c->pending_len;
    c->pending_len = 0;
    return n;
  }

  size_t mtu = ngtcp2_conn_get_max_tx_udp_payload_size(c->q);
  size_t quantum = ngtcp2_conn_get_send_quantum(c->q) / mtu;
  if (quantum == 0) quantum = 1;
  if (max_pkts > quantum) max_pkts = quantum;
  if (max_pkts == 0) max_pkts = 1;

  ngtcp2_path_storage ps;
  ngtcp2_path_storage_zero(&ps);
  ngtcp2_pkt_info pi;
  uint8_t *p = buf; /* where the next datagram goes */
  uint8_t *end = buf; /* the end of the last one written */
  size_t npkts = 0, gso = 0;
  nghttp3_vec vec[16];
  if (stride && stride < mtu) mtu = stride;

  for (;;) {
    size_t room = cap - (size_t)(p - buf);
    if (p > buf + cap || room < mtu) break;
    int64_t sid = -1;
    int fin = 0;
    nghttp3_ssize sveccnt = 0;
    if (c->h3 && ngtcp2_conn_get_max_data_left(c->q)) {
      sveccnt = nghttp3_conn_writev_stream(c->h3, &sid, &fin, vec, 16);
      if (sveccnt < 0) {
        ngtcp2_connection_close_error_set_application_error(
            &c->last_error, nghttp3_err_infer_quic_app_error_code((int)sveccnt), NULL, 0);
        c->has_error = 1;
        conn_fail(c, "nghttp3_conn_writev_stream: %s", nghttp3_strerror((int)sveccnt));
        return STOQ_CONN_CLOSE;
      }
    }
    ngtcp2_ssize ndatalen = -1;
    uint32_t flags = NGTCP2_WRITE_STREAM_FLAG_MORE | (fin ? NGTCP2_WRITE_STREAM_FLAG_FIN : 0);
    uint8_t *dst = p;
    ngtcp2_ssize nwrite = ngtcp2_conn_writev_stream(c->q, &ps.path, &pi, dst, mtu, &ndatalen, flags, sid,
                                                    (const ngtcp2_vec *)vec, (size_t)sveccnt, now);
    if (nwrite < 0) {
      switch (nwrite) {
      case NGTCP2_ERR_STREAM_DATA_BLOCKED:
        nghttp3_conn_block_stream(c->h3, sid);
        continue;
      case NGTCP2_ERR_STREAM_SHUT_WR:
        nghttp3_conn_shutdown_stream_write(c->h3, sid);
        continue;
      case NGTCP2_ERR_WRITE_MORE:
        if (nghttp3_conn_add_write_offset(c->h3, sid, (size_t)ndatalen) != 0) return map_error(c, NGTCP2_ERR_INTERNAL);
        continue;
      default:
        return map_error(c, (int)nwrite);
      }
    }
    if (ndatalen >= 0 && nghttp3_conn_add_write_offset(c->h3, sid, (size_t)ndatalen) != 0)
      return map_error(c, NGTCP2_ERR_INTERNAL);
    if (nwrite == 0) break;

    if (npkts == 0) {
      gso = (size_t)nwrite;
      *ecn = (uint8_t)pi.ecn;
      memcpy(remote, ps.path.remote.addr, sizeof(*remote));
    } else if ((size_t)nwrite > gso || pi.ecn != *ecn || !same_addr(remote, ps.path.remote.addr)) {
      /* Cannot join this run: keep it for the next call. */
      memcpy(c->pending, dst, (size_t)nwrite);
      c->pending_len = (size_t)nwrite;
      c->pending_ecn = (uint8_t)pi.ecn;
      memcpy(&c->pending_remote, ps.path.remote.addr, sizeof(c->pending_remote));
      break;
    }
    end = p + nwrite;
    p += stride ? stride : (size_t)nwrite;
    npkts++;
    if (npkts >= max_pkts || (size_t)nwrite < gso) break;
  }
  ngtcp2_conn_update_pkt_tx_time(c->q, now);
  *segment_size = gso;
  return end - buf;
}

ssize_t stoq_conn_write_close(stoq_conn *c, uint8_t *buf, size_t cap, uint64_t app_error, uint64_t now) {
  if (ngtcp2_conn_is_in_draining_period(c->q)) return 0;
  ngtcp2_connection_close_error e;
  if (c->has_error) {
    e = c->last_error;
  } else {
    ngtcp2_connection_close_error_set_application_error(&e, app_error, NULL, 0);
  }
  ngtcp2_path_storage ps;
  ngtcp2_path_storage_zero(&ps);
  ngtcp2_pkt_info pi;
  ngtcp2_ssize n = ngtcp2_conn_write_connection_close(c->q, &ps.path, &pi, buf, cap, &e, now);
  return n < 0 ? -1 : n;
}

uint64_t stoq_conn_expiry(stoq_conn *c) { return ngtcp2_conn_get_expiry(c->q); }

int stoq_conn_handle_expiry(stoq_conn *c, uint64_t now) { return map_error(c, ngtcp2_conn_handle_expiry(c->q, now)); }

uint64_t stoq_conn_close_deadline(stoq_conn *c, uint64_t now) { return now + 3 * ngtcp2_conn_get_pto(c->q); }

int stoq_conn_initiate_key_update(stoq_conn *c, uint64_t now) { return ngtcp2_conn_initiate_key_update(c->q, now); }

void stoq_conn_set_app(stoq_conn *c, void *app) { c->app = app; }
void *stoq_conn_get_app(const stoq_conn *c) { return c->app; }
int stoq_conn_is_established(const stoq_conn *c) { return c->established; }
const char *stoq_conn_error_string(const stoq_conn *c) { return c->errstr; }

void stoq_conn_remote(const stoq_conn *c, struct sockaddr_in6 *out) {
  const ngtcp2_path *p = ngtcp2_conn_get_path(c->q);
  memcpy(out, p->remote.addr, sizeof(*out));
}

void stoq_conn_get_stats(const stoq_conn *c, stoq_conn_stats *out) {
  ngtcp2_conn_stat st;
  ngtcp2_conn_get_conn_stat(c->q, &st);
  out->bytes_in_flight = st.bytes_in_flight;
  out->cwnd = st.cwnd;
  out->smoothed_rtt_ns = st.smoothed_rtt;
  out->min_rtt_ns = st.min_rtt;
  out->pkts_lost = 0;
  out->body_bytes_received = c->body_rx;
  out->body_bytes_sent = c->body_tx;
  out->streams_open = c->streams_open;
}
