/*
 * Stalled streams (slowloris): a client that begins a request's head and stops, sends a head
 * and part of its body and stops, or stops granting flow control to a response, while keeping
 * its connection alive with ACKs and PINGs, held the stream (and the head's buffer), the body's
 * memfd or temp file, or the response's mapping, for as long as it liked. A server endpoint
 * watches the streams that can stall and reports those that did (STOQ_HEAD_TIMEOUT,
 * `limits.body_timeout`, `limits.send_timeout`; what is done with a body or a response is
 * QUICEndpoint's, a head is refused here: the application never saw it).
 *
 * Cost on the packet path: a store of the endpoint's clock per STREAM frame received and per
 * acknowledgement of body bytes; entering and leaving the lists is O(1) and allocates nothing
 * (the links live in the stream). The sweep runs about once a second and walks only the
 * streams receiving a body or holding unacknowledged body bytes.
 *
 * Why C: the progress marks are taken in nghttp3's callbacks, per frame; the sweep reads
 * ngtcp2's flow control state, which Swift never sees.
 */
#include "stoq_internal.h"

/* Puts `s` at the head of list `w` (WATCH_RX or WATCH_TX); false if it was on it already. */
static int link_in(stoq_stream *s, int w) {
  struct stoq_watch_list *l = &s->conn->ep->watching[w];
  struct stoq_watch_link *k = &s->watch[w];
  if (k->on) return 0;
  k->on = 1;
  k->prev = NULL;
  k->next = l->head;
  if (l->head) l->head->watch[w].prev = s;
  l->head = s;
  return 1;
}

/* Takes `s` off list `w` (if it is on it), moving the list's sweep cursor past it. */
static void link_out(stoq_stream *s, int w) {
  struct stoq_watch_link *k = &s->watch[w];
  if (!k->on) return;
  struct stoq_watch_list *l = &s->conn->ep->watching[w];
  if (l->cursor == s) l->cursor = k->next;
  if (k->prev) k->prev->watch[w].next = k->next;
  else l->head = k->next;
  if (k->next) k->next->watch[w].prev = k->prev;
  k->prev = k->next = NULL;
  k->on = 0;
}

void watch_rx(stoq_stream *s) {
  if (s->conn->is_server && link_in(s, WATCH_RX)) s->rx_moved = s->conn->ep->now;
}

void unwatch_rx(stoq_stream *s) { link_out(s, WATCH_RX); }

void watch_tx(stoq_stream *s, uint64_t given) {
  if (!s->conn->is_server || given == 0) return;
  s->tx_given += given;
  if (link_in(s, WATCH_TX)) { /* the clocks start when there is something to send */
    s->tx_moved = s->tx_window = s->conn->ep->now;
    s->tx_window_acked = s->tx_acked;
  }
}

void unwatch_tx(stoq_stream *s) { link_out(s, WATCH_TX); }

void stoq_endpoint_ctx_clock(stoq_endpoint_ctx *ep, uint64_t now) { ep->now = now; }

int stoq_endpoint_ctx_watching(const stoq_endpoint_ctx *ep) {
  return ep->watching[WATCH_RX].head || ep->watching[WATCH_TX].head;
}

void stoq_stream_set_expected_length(stoq_stream *s, uint64_t bytes) { s->expected = bytes; }
uint64_t stoq_stream_expected_length(const stoq_stream *s) { return s->expected; }
uint64_t stoq_stream_body_acked(const stoq_stream *s, uint64_t *given) {
  if (given) *given = s->tx_given;
  return s->tx_acked;
}

/* Whether `then` is at least `span` before `now` (the endpoint's clock; never true for a
 * stamp from after `now`). */
static int older(uint64_t now, uint64_t then, uint64_t span) { return now > then && now - then >= span; }

/* A request head not complete STOQ_HEAD_TIMEOUT after it began (its HEADERS frame stopped, or
 * waits for QPACK instructions that do not come): the stream is reset, not processed. */
static void head_stalled(stoq_stream *s) {
  stoq_conn *c = s->conn;
  refuse_head(c, s, STOQ_H3_REQUEST_REJECTED);
  if (c->ep->ev.on_stalled) c->ep->ev.on_stalled(c->ep->ev.ctx, c, s, STOQ_STALL_HEAD);
}

/* A request body that stopped: what was queued lands (the application closes the sink's file
 * once it hears), the rest is dropped, and the peer is asked to stop sending it. */
static void body_stalled(stoq_stream *s) {
  stoq_conn *c = s->conn;
  unwatch_rx(s);
  sink_drain(s, 0);
  s->rx_refused = 1;
  ngtcp2_conn_shutdown_stream_read(c->q, s->id, STOQ_H3_NO_ERROR);
  if (c->ep->ev.on_stalled) c->ep->ev.on_stalled(c->ep->ev.ctx, c, s, STOQ_STALL_BODY);
}

/* Whether the peer holds the response back: no credit for the stream, or nothing of the
 * connection's responses acknowledged for `timeout`. A response with credit on
 * a connection that moves is waiting its turn (nghttp3 sends a connection's responses of one
 * urgency one after another) or for the congestion window: not the peer's stall. */
static int peer_holds(stoq_stream *s, uint64_t now, uint64_t timeout) {
  stoq_conn *c = s->conn;
  /* No connection credit alone is not the peer's stall while the connection moves: a receiver
   * bound by flow control (a slow disk behind it) is at zero between its updates. */
  return older(now, c->tx_moved, timeout) || ngtcp2_conn_get_max_stream_data_left(c->q, s->id) == 0;
}

/* Whether `s`'s response went under `min_rate` bytes a second over its window of `span` while
 * the peer held it; a window passed otherwise ends and the next begins. */
static int too_slow(stoq_stream *s, uint64_t now, uint64_t span, uint64_t min_rate) {
  if (!min_rate || !older(now, s->tx_window, span)) return 0;
  double want = (double)min_rate * (double)(now - s->tx_window) / 1e9;
  if ((double)(s->tx_acked - s->tx_window_acked) < want && peer_holds(s, now, span)) return 1;
  s->tx_window = now;
  s->tx_window_acked = s->tx_acked;
  return 0;
}

int stoq_endpoint_ctx_sweep(stoq_endpoint_ctx *ep, uint64_t now, uint64_t body_timeout, uint64_t send_timeout,
                            uint64_t min_send_rate) {
  ep->now = now;
  int n = 0;
  struct stoq_watch_list *rx = &ep->watching[WATCH_RX];
  for (stoq_stream *s = rx->head; s; s = rx->cursor) {
    rx->cursor = s->watch[WATCH_RX].next;
    if (s->in_head) { /* heads are always swept */
      if (!older(now, s->rx_moved, STOQ_HEAD_TIMEOUT)) continue;
      head_stalled(s);
      n++;
      continue;
    }
    if (!body_timeout) continue;
    if (s->pending) { /* its credit waits for the writer (a slow disk), not for the peer */
      s->rx_moved = now;
      continue;
    }
    if (!older(now, s->rx_moved, body_timeout)) continue;
    body_stalled(s);
    n++;
  }
  rx->cursor = NULL;
  if (send_timeout) {
    struct stoq_watch_list *l = &ep->watching[WATCH_TX];
    for (stoq_stream *s = l->head; s; s = l->cursor) {
      l->cursor = s->watch[WATCH_TX].next;
      int what;
      if (older(now, s->tx_moved, send_timeout) && peer_holds(s, now, send_timeout)) what = STOQ_STALL_SEND;
      else if (too_slow(s, now, send_timeout, min_send_rate)) what = STOQ_STALL_SLOW;
      else continue;
      unwatch_tx(s);
      if (ep->ev.on_stalled) ep->ev.on_stalled(ep->ev.ctx, s->conn, s, what);
      n++;
    }
    l->cursor = NULL;
  }
  return n;
}
