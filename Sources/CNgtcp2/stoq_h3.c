/*
 * HTTP/3 over one connection: nghttp3's callbacks, request and response heads, and the body
 * a stream sends (caller-owned pieces, released as the peer acknowledges them).
 *
 * Why C: nghttp3 calls back per header field and per DATA frame from inside
 * nghttp3_conn_read_stream, with its own rcbuf and vec structs. The head's fields are gathered
 * here into the stream's buffer and handed to Swift once, at the end of the head, where the
 * HTTP rules live (STOQQUIC's HTTPRequestHead); bodies never cross into Swift at all.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How much response body one nghttp3 DATA frame carries. */
#define BODY_CHUNK (1u << 20)
/* A head's buffer starts this large, when its first field comes, and doubles as more come, up
 * to STOQ_HEAD_BUFFER: most heads fit the first, and a HEADERS frame that begins and stops (or
 * waits for QPACK instructions) holds none. */
#define HEAD_FIRST 1024u

/* ---- Streams --------------------------------------------------------------- */

stoq_stream *stream_new(stoq_conn *c, int64_t id) {
  stoq_stream *s = calloc(1, sizeof(*s));
  if (!s) return NULL;
  s->id = id;
  s->conn = c;
  s->max_age = -1;
  s->expected = UINT64_MAX;
  s->sink_fd = -1;
  s->sink_limit = UINT64_MAX;
  s->next = c->streams;
  if (c->streams) c->streams->prev = s;
  c->streams = s;
  c->streams_open++;
  return s;
}

void stream_end(stoq_conn *c, stoq_stream *s, uint64_t code) {
  sink_drain(s, 1); /* the application may close the sink's fd once it hears of the close */
  if (s->abandoned != 2 && c->ep->ev.on_stream_close)
    c->ep->ev.on_stream_close(c->ep->ev.ctx, c, s, s->abandoned ? s->abandon_code : code);
  stream_free(c, s);
}

/* The head buffer goes (the head was handed over or refused, or the stream goes). */
static void head_free(stoq_stream *s) {
  free(s->head);
  s->conn->head_bytes -= s->head_cap;
  s->head = NULL;
  s->head_cap = 0;
}

void stream_free(stoq_conn *c, stoq_stream *s) {
  sink_drain(s, 1);
  unwatch_rx(s);
  unwatch_tx(s);
  if (s->abandoned == 1) c->abandoned--;
  head_free(s);
  if (s->prev) s->prev->next = s->next;
  else c->streams = s->next;
  if (s->next) s->next->prev = s->prev;
  for (unsigned i = 0; i < s->p_count; i++) {
    struct body_piece *p = &s->pieces[(s->p_head + i) % STOQ_BODY_PIECES];
    if (p->release) p->release(p->arg);
  }
  if (s->hashing && !s->digest_done) gnutls_hash_deinit(s->hash, NULL);
  free(s->early_nv);
  c->streams_open--;
  free(s);
}

void stoq_stream_set_app(stoq_stream *s, void *app) { s->app = app; }
void *stoq_stream_get_app(const stoq_stream *s) { return s->app; }
int64_t stoq_stream_id(const stoq_stream *s) { return s->id; }
int stoq_stream_body_complete(const stoq_stream *s) { return s->body_complete; }
int64_t stoq_stream_max_age(const stoq_stream *s) { return s->max_age; }
int stoq_stream_status(const stoq_stream *s) { return s->status; }
void stoq_stream_set_max_age(stoq_stream *s, int64_t max_age) { s->max_age = max_age; }

/* ---- nghttp3 glue ----------------------------------------------------------- */

void consume(stoq_conn *c, int64_t stream_id, size_t n) {
  ngtcp2_conn_extend_max_stream_offset(c->q, stream_id, n);
  ngtcp2_conn_extend_max_offset(c->q, n);
}

/* A client that resets a request's body before it has an answer cancels the request (RFC 9114
 * §4.1.1): nothing will be answered, so the sending half is reset too. A request already
 * answered keeps its response: the client may have stopped sending because it was answered.
 * Either way the body will not end: once what was queued of it has landed, the application
 * hears the request ended, aborted, and lets go of what it held for it (a memory file, a temp
 * file) now, not when the stream closes. Not a request it never heard of (a head), nor one
 * whose end it heard or whose body it refused (too large, timed out, answered unread). */
void request_body_reset(stoq_conn *c, stoq_stream *s) {
  if (s->body_complete) return;
  unwatch_rx(s);
  if (!s->responded) ngtcp2_conn_shutdown_stream_write(c->q, s->id, STOQ_H3_REQUEST_CANCELLED);
  if (s->in_head || s->rx_refused || s->end_told || !c->ep->ev.on_request_end) return;
  sink_drain(s, 1);
  s->end_told = 1;
  c->ep->ev.on_request_end(c->ep->ev.ctx, c, s, 1);
}

stoq_stream *stream_find(stoq_conn *c, int64_t id) {
  stoq_stream *s = c->streams;
  while (s && s->id != id) s = s->next;
  return s;
}

static int h3_acked_stream_data(nghttp3_conn *h3, int64_t stream_id, uint64_t datalen, void *ud, void *sud) {
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  /* Each piece goes back once the peer has acknowledged all of it (acks arrive in order:
   * nghttp3 counts them). */
  if (!s) return 0;
  s->p_acked += datalen;
  /* Progress for the stall watch: the peer took these bytes. */
  s->tx_moved = c->tx_moved = c->ep->now;
  s->tx_acked += datalen;
  if (s->tx_acked >= s->tx_given) unwatch_tx(s);
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
  if (!s && !c->is_server) /* one the application reset (see stoq_stream_reset) */
    for (s = c->streams; s && !(s->abandoned && s->id == stream_id); s = s->next) {
    }
  c->h3_closed = stream_id;
  if (s) stream_end(c, s, app_error_code);
  if (c->is_server && ngtcp2_is_bidi_stream(stream_id)) ngtcp2_conn_extend_max_streams_bidi(c->q, 1);
  return 0;
}

/* nghttp3 0.8 keeps a stream whose head (or trailers) waits for QPACK encoder instructions when
 * the transport closes it, and once they come it decodes the head, so the application answers
 * a stream that is gone; nghttp3 then frees the stream while it is still scheduled to send, and
 * the next write reads the freed stream (1.12 deletes such a stream at once). With its read side
 * shut, nghttp3 drops what it holds of the stream unread and deletes it when the instructions
 * come (or with the connection), with no callback but h3_stream_close; the peer's encoder hears
 * the stream cancelled. Until then nothing is sent on it (stoq_stream_respond and the others
 * refuse) and it is not watched. Rare: a stream walk. */
int stream_outlived(stoq_conn *c, int64_t id) {
  stoq_stream *s = stream_find(c, id);
  if (s) {
    s->transport_closed = 1;
    unwatch_rx(s);
    unwatch_tx(s);
    head_free(s);
  }
  return nghttp3_conn_shutdown_stream_read(c->h3, id);
}

/* nghttp3 0.8 returns NGHTTP3_ERR_MALFORMED_HTTP_MESSAGING from nghttp3_conn_read_stream for a
 * request whose body does not match its content-length (or a response's, on a client), which
 * RFC 9114 §4.1.2 makes an error of that stream alone: one bad PUT ended every transfer of the
 * connection, and the 400 already answered to it never left. The stream's read side shuts in
 * nghttp3 (what follows is dropped unread) and in QUIC (STOP_SENDING, H3_MESSAGE_ERROR). A server
 * that answered keeps sending its answer (§4.1.2 lets it answer a malformed request); otherwise
 * the stream is reset both ways and the application hears it closed. Rare: a stream walk. */
int malformed_message(stoq_conn *c, int64_t id) {
  stoq_stream *s = stream_find(c, id);
  if (s) {
    s->rx_refused = 1;
    unwatch_rx(s);
  }
  int rv = nghttp3_conn_shutdown_stream_read(c->h3, id);
  if (s && s->responded) ngtcp2_conn_shutdown_stream_read(c->q, id, STOQ_H3_MESSAGE_ERROR);
  else ngtcp2_conn_shutdown_stream(c->q, id, STOQ_H3_MESSAGE_ERROR);
  return rv;
}

static void answered_early(stoq_conn *c, stoq_stream *s);

static int h3_recv_data(nghttp3_conn *h3, int64_t stream_id, const uint8_t *data, size_t len, void *ud, void *sud) {
  (void)h3;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s || s->sink_errno == EFBIG || s->rx_refused) { /* no stream, or refused already: the rest is dropped */
    consume(c, stream_id, len);
    return 0;
  }
  if (c->is_server && s->responded && s->sink_fd < 0 && !s->hashing) { /* answered, and unread */
    answered_early(c, s);
    consume(c, stream_id, len);
    return 0;
  }
  s->rx_moved = c->ep->now; /* progress for the stall watch */
  if (s->received + len > s->sink_limit) {
    consume(c, stream_id, len);
    s->sink_errno = EFBIG;
    if (c->is_server && !s->responded && c->ep->ev.on_request_end) {
      /* More body than allowed (413, or a quota's 507): the answer does not need the rest, so
       * stop the peer sending it with H3_NO_ERROR and answer now (RFC 9114 §4.1), on the
       * stream's sending half. The connection stays. The writes already queued land first:
       * the application closes the sink's file once it hears of the end. */
      ngtcp2_conn_shutdown_stream_read(c->q, stream_id, STOQ_H3_NO_ERROR);
      unwatch_rx(s);
      sink_drain(s, 0);
      s->end_told = 1; /* not again at the FIN, which nghttp3 may pass on in this same read */
      c->ep->ev.on_request_end(c->ep->ev.ctx, c, s, 0);
      return 0;
    }
    /* More body than allowed: refuse the rest of the stream, keep the connection. */
    ngtcp2_conn_shutdown_stream(c->q, stream_id, STOQ_H3_EXCESSIVE_LOAD);
    unwatch_rx(s);
    unwatch_tx(s);
    return 0;
  }
  /* Bytes queued for the writer keep their credit until written: flow control is what slows
   * a peer that sends faster than the disk takes it (stoq_sink.c). */
  size_t queued = sink_take(s, data, len);
  if (queued < len) consume(c, stream_id, len - queued);
  c->body_rx += len;
  if (s->mark && s->received >= s->mark) {
    s->mark = 0;
    if (c->ep->ev.on_body_mark) c->ep->ev.on_body_mark(c->ep->ev.ctx, c, s);
  }
  return 0;
}

static int h3_deferred_consume(nghttp3_conn *h3, int64_t stream_id, size_t n, void *ud, void *sud) {
  (void)h3;
  (void)sud;
  consume(ud, stream_id, n);
  return 0;
}

/* A head's fields are gathered into the stream's buffer (grown as they come, freed once the
 * head is handed over) and given to the application whole at the end of the head. A server
 * watches the head from here: it must end within STOQ_HEAD_TIMEOUT (stoq_stall.c). */
static int h3_begin_headers(nghttp3_conn *h3, int64_t stream_id, void *ud, void *sud) {
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s) {
    if (!c->is_server) return 0;
    s = stream_new(c, stream_id);
    if (!s) return NGHTTP3_ERR_NOMEM;
    nghttp3_conn_set_stream_user_data(h3, stream_id, s);
  }
  s->head_len = 0;
  s->head_nfields = 0;
  s->head_dropped = 0;
  s->head_section = 0;
  s->in_head = 1;
  watch_rx(s);
  return 0;
}

void refuse_head(stoq_conn *c, stoq_stream *s, uint64_t code) {
  head_free(s);
  s->rx_refused = 1; /* what nghttp3 still passes on in this read is dropped (it checks only as a read starts) */
  unwatch_rx(s);
  ngtcp2_conn_shutdown_stream(c->q, s->id, code); /* nghttp3 stops reading it as the STOP_SENDING goes */
}

/* Grows the head buffer toward `want` bytes (doubling, at most STOQ_HEAD_BUFFER). A head that
 * would take its connection's heads past STOQ_HEAD_BYTES_MAX is refused (-1). Without memory
 * the buffer stays as it is: what does not fit is counted, as ever. */
static int head_grow(stoq_conn *c, stoq_stream *s, size_t want) {
  size_t cap = s->head_cap ? s->head_cap : HEAD_FIRST;
  while (cap < want && cap < STOQ_HEAD_BUFFER) cap *= 2;
  if (cap > STOQ_HEAD_BUFFER) cap = STOQ_HEAD_BUFFER;
  if (c->head_bytes - s->head_cap + cap > STOQ_HEAD_BYTES_MAX) {
    refuse_head(c, s, STOQ_H3_EXCESSIVE_LOAD);
    return -1;
  }
  uint8_t *p = realloc(s->head, cap);
  if (!p) return 0;
  s->head = p;
  c->head_bytes += cap - s->head_cap;
  s->head_cap = cap;
  return 0;
}

/* Keeps one field: what does not fit is counted (section size, dropped fields), not kept; a
 * value that fits only in part keeps its start and its length on the wire. No HTTP rule here. */
static int h3_recv_header(nghttp3_conn *h3, int64_t stream_id, int32_t token, nghttp3_rcbuf *name, nghttp3_rcbuf *value,
                          uint8_t flags, void *ud, void *sud) {
  (void)h3;
  (void)stream_id;
  (void)token;
  (void)flags;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s || s->rx_refused) return 0;
  nghttp3_vec n = nghttp3_rcbuf_get_buf(name), v = nghttp3_rcbuf_get_buf(value);
  /* RFC 9114 §4.2.2 counts name + value + 32 per field. */
  s->head_section += n.len + v.len + 32;
  size_t want = s->head_len + sizeof(stoq_field_hdr) + n.len + v.len;
  if (want > s->head_cap && s->head_cap < STOQ_HEAD_BUFFER && head_grow(c, s, want) != 0) return 0;
  size_t room = s->head_cap - s->head_len;
  if (room < sizeof(stoq_field_hdr) + n.len || n.len > UINT32_MAX || v.len > UINT32_MAX) {
    s->head_dropped++;
    return 0;
  }
  room -= sizeof(stoq_field_hdr) + n.len;
  stoq_field_hdr fh = {(uint32_t)n.len, (uint32_t)v.len, (uint32_t)(v.len < room ? v.len : room)};
  uint8_t *at = s->head + s->head_len;
  memcpy(at, &fh, sizeof(fh));
  memcpy(at + sizeof(fh), n.base, n.len);
  memcpy(at + sizeof(fh) + n.len, v.base, fh.value_kept);
  s->head_len += sizeof(fh) + n.len + fh.value_kept;
  s->head_nfields++;
  return 0;
}

static int h3_end_headers(nghttp3_conn *h3, int64_t stream_id, int fin, void *ud, void *sud) {
  (void)h3;
  (void)stream_id;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s || s->rx_refused) return 0; /* refused before its end (refuse_head) */
  s->fin_with_headers = fin;
  s->in_head = 0;
  /* The buffer leaves the stream first: the callback may end the stream (and free it). */
  uint8_t *buf = s->head;
  c->head_bytes -= s->head_cap;
  s->head = NULL;
  s->head_cap = 0;
  stoq_head head = {
      .fields = buf,
      .fields_len = buf ? s->head_len : 0,
      .nfields = buf ? s->head_nfields : 0,
      .dropped = s->head_dropped,
      .section_size = s->head_section,
      .has_body = !fin,
  };
  if (c->is_server) {
    /* The head's watch ends; a body's starts, before the application, which may answer at once. */
    unwatch_rx(s);
    if (!fin) watch_rx(s);
    if (c->ep->ev.on_request) c->ep->ev.on_request(c->ep->ev.ctx, c, s, &head);
  } else {
    if (c->ep->ev.on_response) c->ep->ev.on_response(c->ep->ev.ctx, c, s, &head);
  }
  free(buf);
  return 0;
}

static int h3_end_stream(nghttp3_conn *h3, int64_t stream_id, void *ud, void *sud) {
  (void)h3;
  (void)stream_id;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s || s->in_head) return 0; /* a head refused: the application never had the request */
  (void)c;
  s->body_complete = 1;
  unwatch_rx(s);
  sink_end(s); /* the digest, and a server's on_request_end, once the body is written */
  return 0;
}

static int h3_stop_sending(nghttp3_conn *h3, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)h3;
  (void)sud;
  stoq_conn *c = ud;
  return ngtcp2_conn_shutdown_stream_read(c->q, stream_id, code) == 0 ? 0 : NGHTTP3_ERR_CALLBACK_FAILURE;
}

static int h3_reset_stream(nghttp3_conn *h3, int64_t stream_id, uint64_t code, void *ud, void *sud) {
  (void)h3;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (s) unwatch_tx(s); /* nghttp3 resets the sending half: no acknowledgement is waited for */
  return ngtcp2_conn_shutdown_stream_write(c->q, stream_id, code) == 0 ? 0 : NGHTTP3_ERR_CALLBACK_FAILURE;
}

/* The peer's GOAWAY (RFC 9114 §5.2). A client sends no new request on the connection, and ends
 * each it sent with a stream id at or above `id` (the server will not process them) as if it
 * had reset it with H3_REQUEST_REJECTED: its application hears that, outside this callback, and
 * may send it again elsewhere. A server is told a push id: it makes no pushes. */
static int h3_shutdown(nghttp3_conn *h3, int64_t id, void *ud) {
  (void)h3;
  stoq_conn *c = ud;
  if (c->is_server) return 0;
  c->peer_going_away = 1;
  for (stoq_stream *s = c->streams; s; s = s->next)
    if (s->id >= id && !s->abandoned) stoq_stream_reset(c, s, STOQ_H3_REQUEST_REJECTED);
  return 0;
}

int setup_h3(stoq_conn *c) {
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
      .shutdown = h3_shutdown,
  };
  nghttp3_settings st;
  nghttp3_settings_default(&st);
  st.qpack_max_dtable_capacity = 4096;
  st.qpack_blocked_streams = 100;
  st.max_field_section_size = STOQ_HEAD_BUFFER;
  int rv = c->is_server ? nghttp3_conn_server_new(&c->h3, &cb, &st, &c->ep->nghttp3_mem, c)
                        : nghttp3_conn_client_new(&c->h3, &cb, &st, &c->ep->nghttp3_mem, c);
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
static nghttp3_ssize body_read(nghttp3_conn *h3, int64_t stream_id, nghttp3_vec *vec, size_t veccnt, uint32_t *pflags,
                               void *ud, void *sud) {
  (void)h3;
  (void)stream_id;
  (void)veccnt;
  stoq_conn *c = ud;
  stoq_stream *s = sud;
  if (!s) return NGHTTP3_ERR_WOULDBLOCK; /* abandoned: the transport has reset it */
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

static nghttp3_nv make_nv(const char *n, const char *v) {
  nghttp3_nv nv = {(uint8_t *)(uintptr_t)n, (uint8_t *)(uintptr_t)v, strlen(n), strlen(v), NGHTTP3_NV_FLAG_NONE};
  return nv;
}

/* A head's fields: `fixed` the caller sets, then every one of `hdrs` (at most STOQ_MAX_HEADERS,
 * checked before), none dropped. In `stack` when they fit (most heads), else allocated; NULL
 * without memory. Freed with nv_free; nghttp3 copies what it is given. */
#define NV_STACK 32
static nghttp3_nv *nv_make(nghttp3_nv *stack, size_t fixed, const stoq_header *hdrs, size_t nhdrs) {
  nghttp3_nv *nva = fixed + nhdrs <= NV_STACK ? stack : malloc((fixed + nhdrs) * sizeof(*nva));
  if (!nva) return NULL;
  for (size_t i = 0; i < nhdrs; i++) nva[fixed + i] = make_nv(hdrs[i].name, hdrs[i].value);
  return nva;
}

static void nv_free(nghttp3_nv *nva, nghttp3_nv *stack) {
  if (nva != stack) free(nva);
}

/* Submits a server's answer: :status, server, then the application's fields, and `dr` reading
 * its body (NULL: the stream ends with the head). Nothing is sent when it fails. */
static int submit_answer(stoq_conn *c, stoq_stream *s, int status, const stoq_header *hdrs, size_t nhdrs,
                         const nghttp3_data_reader *dr) {
  if (s->responded) return STOQ_ERR_ANSWERED; /* one response per request */
  if (s->transport_closed) return NGHTTP3_ERR_STREAM_NOT_FOUND;
  if (nhdrs > STOQ_MAX_HEADERS) return STOQ_ERR_HEADERS;
  nghttp3_nv stack[NV_STACK];
  nghttp3_nv *nva = nv_make(stack, 2, hdrs, nhdrs);
  if (!nva) return NGHTTP3_ERR_NOMEM;
  char st[8];
  snprintf(st, sizeof(st), "%d", status);
  nva[0] = make_nv(":status", st);
  nva[1] = make_nv("server", "stoq");
  int rv = nghttp3_conn_submit_response(c->h3, s->id, nva, 2 + nhdrs, dr);
  nv_free(nva, stack);
  if (rv == 0) s->responded = 1, s->status = status;
  return rv;
}

/* A request answered while its body is still arriving (some of it came: at the answer, or
 * after it), whose body nothing reads (no sink, no digest: refused at its head, 401, 403, 429,
 * 405, 413 …): the rest is not needed, so the peer is asked to stop sending it (STOP_SENDING with
 * H3_NO_ERROR, RFC 9114 §4.1.2) and what still arrives is dropped. Else a client could keep
 * sending on a refused stream, taking the worker's time and the link, past the rate limits. A
 * GET whose FIN comes after its HEADERS sends no body, and is left alone. */
static void answered_early(stoq_conn *c, stoq_stream *s) {
  if (!c->is_server || s->fin_with_headers || s->body_complete || s->rx_refused || s->sink_fd >= 0 || s->hashing)
    return;
  s->rx_refused = 1;
  unwatch_rx(s);
  ngtcp2_conn_shutdown_stream_read(c->q, s->id, STOQ_H3_NO_ERROR);
}

int stoq_stream_respond_streamed(stoq_conn *c, stoq_stream *s, int status, const stoq_header *hdrs, size_t nhdrs) {
  nghttp3_data_reader dr = {.read_data = body_read};
  /* A HEAD's answer is its head: the stream ends there, and pieces appended are refused. */
  int rv = submit_answer(c, s, status, hdrs, nhdrs, s->no_content ? NULL : &dr);
  if (rv == 0) {
    if (s->no_content) s->stream_eof = 1;
    if (s->received) answered_early(c, s);
  }
  return rv;
}

int stoq_stream_body_append(stoq_conn *c, stoq_stream *s, const uint8_t *base, uint64_t len, int eof,
                            void (*release)(void *), void *arg) {
  if ((c->is_server && !s->responded) || s->stream_eof || s->p_count == STOQ_BODY_PIECES || s->transport_closed)
    return -1;
  struct body_piece *p = &s->pieces[(s->p_head + s->p_count) % STOQ_BODY_PIECES];
  p->base = base;
  p->len = len;
  p->release = release;
  p->arg = arg;
  s->p_count++;
  watch_tx(s, len);
  if (eof) s->stream_eof = 1;
  if (s->stream_blocked) {
    s->stream_blocked = 0;
    nghttp3_conn_resume_stream(c->h3, s->id);
  }
  return 0;
}

/* The body is the stream's from here, whatever comes of the answer: sent and released once
 * acknowledged (or at close), or, refused, released before this returns. A refusal leaves
 * whatever the stream sends as it was: a second answer does not touch the first. */
int stoq_stream_respond(stoq_conn *c, stoq_stream *s, int status, const stoq_header *hdrs, size_t nhdrs,
                        const uint8_t *body, uint64_t body_len, int has_body, void (*release)(void *), void *arg) {
  nghttp3_data_reader dr = {.read_data = body_read};
  int reader = has_body && body_len > 0 && !s->no_content;
  int rv = submit_answer(c, s, status, hdrs, nhdrs, reader ? &dr : NULL);
  if (rv != 0) {
    if (release) release(arg);
    return rv;
  }
  set_whole_body(s, body, body_len, release, arg); /* nghttp3 reads it no sooner than the next write */
  if (s->received) answered_early(c, s);
  if (reader) watch_tx(s, body_len);
  return 0;
}

void stoq_stream_set_no_content(stoq_stream *s) { s->no_content = 1; }

/* One block: the fields, then their names and values. */
static nghttp3_nv *copy_nv(const nghttp3_nv *nva, size_t n) {
  size_t bytes = n * sizeof(*nva);
  for (size_t i = 0; i < n; i++) bytes += nva[i].namelen + nva[i].valuelen;
  nghttp3_nv *copy = malloc(bytes ? bytes : 1);
  if (!copy) return NULL;
  uint8_t *at = (uint8_t *)(copy + n);
  for (size_t i = 0; i < n; i++) {
    copy[i] = nva[i];
    copy[i].name = memcpy(at, nva[i].name, nva[i].namelen);
    at += nva[i].namelen;
    copy[i].value = memcpy(at, nva[i].value, nva[i].valuelen);
    at += nva[i].valuelen;
  }
  return copy;
}

void drop_early_copies(stoq_conn *c) {
  for (stoq_stream *s = c->streams; s; s = s->next) {
    free(s->early_nv);
    s->early_nv = NULL;
  }
}

int resend_early_requests(stoq_conn *c) {
  int rv = ngtcp2_conn_early_data_rejected(c->q); /* forgets the streams and their ids */
  if (rv != 0) {
    conn_fail(c, "ngtcp2_conn_early_data_rejected: %s", ngtcp2_strerror(rv));
    return -1;
  }
  nghttp3_conn_del(c->h3);
  c->h3 = NULL;
  if (setup_h3(c) != 0) return -1;
  /* Oldest first (the list is newest first), so they go in the order they were made. */
  stoq_stream *s = c->streams;
  while (s && s->next) s = s->next;
  while (s) {
    stoq_stream *prev = s->prev;
    if (s->abandoned) { /* reset by the application: not sent again, and no transport to close it */
      stream_end(c, s, s->abandon_code);
    } else if (s->early_nv) {
      int64_t sid;
      rv = ngtcp2_conn_open_bidi_stream(c->q, &sid, NULL);
      if (rv == 0) {
        s->id = sid;
        rv = nghttp3_conn_submit_request(c->h3, sid, s->early_nv, s->early_nvlen, NULL, s);
      }
      if (rv != 0) {
        /* The server now allows fewer streams than it did: this request fails alone. */
        stream_end(c, s, STOQ_H3_REQUEST_REJECTED);
      }
    }
    s = prev;
  }
  return 0;
}

stoq_stream *stoq_conn_submit_request(stoq_conn *c, const char *method, const char *authority, const char *path,
                                      const stoq_header *hdrs, size_t nhdrs, const uint8_t *body, uint64_t body_len,
                                      int has_body, void (*release)(void *), void *arg, void *app, char *err,
                                      size_t errlen) {
  if (!c->h3) {
    set_err(err, errlen, "the connection is not established");
    return NULL;
  }
  /* Before the handshake: 0-RTT. Kept to be sent again if the server refuses it, which a body
   * (released as it is acknowledged) would not allow. */
  int early = !c->is_server && !c->established;
  int streamed = has_body == STOQ_BODY_STREAMED;
  if (early && has_body && (body_len > 0 || streamed)) {
    set_err(err, errlen, "a request with a body does not go in 0-RTT: send it once the connection is established");
    return NULL;
  }
  if (c->peer_going_away) {
    set_err(err, errlen, "the server is going away (GOAWAY): send it on another connection");
    return NULL;
  }
  if (nhdrs > STOQ_MAX_HEADERS) {
    set_err(err, errlen, "%zu header fields, at most %d go in a request (STOQ_MAX_HEADERS)", nhdrs, STOQ_MAX_HEADERS);
    return NULL;
  }
  nghttp3_nv stack[NV_STACK];
  nghttp3_nv *nva = nv_make(stack, 5, hdrs, nhdrs);
  if (!nva) {
    set_err(err, errlen, "no memory for %zu header fields", nhdrs);
    return NULL;
  }
  nva[0] = make_nv(":method", method);
  nva[1] = make_nv(":scheme", "https");
  nva[2] = make_nv(":authority", authority);
  nva[3] = make_nv(":path", path);
  nva[4] = make_nv("user-agent", "stoq");
  size_t n = 5 + nhdrs;
  int64_t sid;
  int rv = ngtcp2_conn_open_bidi_stream(c->q, &sid, NULL);
  if (rv != 0) {
    nv_free(nva, stack);
    set_err(err, errlen, "no stream available: %s", ngtcp2_strerror(rv));
    return NULL;
  }
  stoq_stream *s = stream_new(c, sid);
  if (!s) {
    nv_free(nva, stack);
    return NULL;
  }
  s->app = app;
  if (!streamed) set_whole_body(s, body, body_len, release, arg);
  nghttp3_data_reader dr = {.read_data = body_read};
  if (early) {
    s->early_nv = copy_nv(nva, n);
    s->early_nvlen = n;
    rv = s->early_nv ? nghttp3_conn_submit_request(c->h3, sid, nva, n, NULL, s) : NGHTTP3_ERR_NOMEM;
  } else {
    rv = nghttp3_conn_submit_request(c->h3, sid, nva, n, has_body && (body_len > 0 || streamed) ? &dr : NULL, s);
  }
  nv_free(nva, stack);
  if (rv != 0) {
    set_err(err, errlen, "nghttp3_conn_submit_request: %s", nghttp3_strerror(rv));
    s->pieces[0].release = NULL; /* the caller keeps ownership on failure */
    stream_free(c, s);
    ngtcp2_conn_shutdown_stream(c->q, sid, STOQ_H3_REQUEST_CANCELLED); /* its credit comes back */
    return NULL;
  }
  return s;
}

/* A client's reset is the application's last word on the stream. From here no callback reaches
 * the stream and nothing more is written to its sink (what was queued has landed), so the
 * application may close the sink's file at once; it hears the stream closed, with its own code,
 * before the connection's next write, outside any callback (stoq_conn_end_abandoned_streams),
 * whether or not the server ever answers: ngtcp2 0.12 forgets a stream whose RESET_STREAM
 * arrives before any of its data (the request's HEADERS not yet sent, or lost), so the
 * STOP_SENDING sent with it gets no RESET_STREAM back and the stream would stay half open until
 * the connection ends. The stoq_stream, and the body pieces ngtcp2 may still retransmit from,
 * stay until the transport closes the stream or the connection ends. */
void stoq_stream_reset(stoq_conn *c, stoq_stream *s, uint64_t code) {
  ngtcp2_conn_shutdown_stream(c->q, s->id, code);
  unwatch_rx(s); /* nothing more is waited for, either way */
  unwatch_tx(s);
  if (c->is_server || s->abandoned) return;
  if (c->h3) nghttp3_conn_set_stream_user_data(c->h3, s->id, NULL);
  sink_drain(s, 1);
  s->abandoned = 1;
  s->abandon_code = code;
  c->abandoned++;
}

int stoq_conn_end_abandoned_streams(stoq_conn *c) {
  int ended = 0;
  while (c->abandoned) {
    stoq_stream *s = c->streams;
    while (s && s->abandoned != 1) s = s->next;
    if (!s) break;
    s->abandoned = 2;
    c->abandoned--;
    if (c->ep->ev.on_stream_close) c->ep->ev.on_stream_close(c->ep->ev.ctx, c, s, s->abandon_code);
    s->app = NULL;
    ended++;
  }
  return ended;
}
