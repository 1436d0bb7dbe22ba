/*
 * Stalled streams (slowloris): a client that sends a request's head and part of its body and
 * stops, or stops granting flow control to a response, while keeping its connection alive with
 * ACKs and PINGs, held the body's memfd or temp file, or the response's mapping, for as long as
 * it liked. A server endpoint watches the streams that can stall and reports those that did
 * (`limits.body_timeout`, `limits.send_timeout`; what is done with them is QUICEndpoint's).
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

void watch_rx(stoq_stream *s) {
  stoq_endpoint_ctx *ep = s->conn->ep;
  if (s->rx_watched || !s->conn->is_server) return;
  s->rx_watched = 1;
  s->rx_moved = ep->now;
  s->rx_wprev = NULL;
  s->rx_wnext = ep->rx_watch;
  if (ep->rx_watch) ep->rx_watch->rx_wprev = s;
  ep->rx_watch = s;
}

void unwatch_rx(stoq_stream *s) {
  if (!s->rx_watched) return;
  stoq_endpoint_ctx *ep = s->conn->ep;
  if (ep->rx_cursor == s) ep->rx_cursor = s->rx_wnext;
  if (s->rx_wprev) s->rx_wprev->rx_wnext = s->rx_wnext;
  else ep->rx_watch = s->rx_wnext;
  if (s->rx_wnext) s->rx_wnext->rx_wprev = s->rx_wprev;
  s->rx_wprev = s->rx_wnext = NULL;
  s->rx_watched = 0;
}

void watch_tx(stoq_stream *s, uint64_t given) {
  stoq_endpoint_ctx *ep = s->conn->ep;
  if (!s->conn->is_server || given == 0) return;
  s->tx_given += given;
  if (s->tx_watched) return;
  s->tx_watched = 1;
  s->tx_moved = ep->now; /* the clock starts when there is something to send */
  s->tx_wprev = NULL;
  s->tx_wnext = ep->tx_watch;
  if (ep->tx_watch) ep->tx_watch->tx_wprev = s;
  ep->tx_watch = s;
}

void unwatch_tx(stoq_stream *s) {
  if (!s->tx_watched) return;
  stoq_endpoint_ctx *ep = s->conn->ep;
  if (ep->tx_cursor == s) ep->tx_cursor = s->tx_wnext;
  if (s->tx_wprev) s->tx_wprev->tx_wnext = s->tx_wnext;
  else ep->tx_watch = s->tx_wnext;
  if (s->tx_wnext) s->tx_wnext->tx_wprev = s->tx_wprev;
  s->tx_wprev = s->tx_wnext = NULL;
  s->tx_watched = 0;
}

void stoq_endpoint_ctx_clock(stoq_endpoint_ctx *ep, uint64_t now) { ep->now = now; }

int stoq_endpoint_ctx_watching(const stoq_endpoint_ctx *ep) { return ep->rx_watch || ep->tx_watch; }

void stoq_stream_set_expected_length(stoq_stream *s, uint64_t bytes) { s->expected = bytes; }
uint64_t stoq_stream_expected_length(const stoq_stream *s) { return s->expected; }
uint64_t stoq_stream_body_acked(const stoq_stream *s, uint64_t *given) {
  if (given) *given = s->tx_given;
  return s->tx_acked;
}

/* Whether `then` is at least `span` before `now` (the endpoint's clock; never true for a
 * stamp from after `now`). */
static int older(uint64_t now, uint64_t then, uint64_t span) { return now > then && now - then >= span; }

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

int stoq_endpoint_ctx_sweep(stoq_endpoint_ctx *ep, uint64_t now, uint64_t body_timeout, uint64_t send_timeout) {
  ep->now = now;
  int n = 0;
  if (body_timeout) {
    for (stoq_stream *s = ep->rx_watch; s; s = ep->rx_cursor) {
      ep->rx_cursor = s->rx_wnext;
      if (s->pending) { /* its credit waits for the writer (a slow disk), not for the peer */
        s->rx_moved = now;
        continue;
      }
      if (!older(now, s->rx_moved, body_timeout)) continue;
      body_stalled(s);
      n++;
    }
    ep->rx_cursor = NULL;
  }
  if (send_timeout) {
    for (stoq_stream *s = ep->tx_watch; s; s = ep->tx_cursor) {
      ep->tx_cursor = s->tx_wnext;
      if (!older(now, s->tx_moved, send_timeout) || !peer_holds(s, now, send_timeout)) continue;
      unwatch_tx(s);
      if (ep->ev.on_stalled) ep->ev.on_stalled(ep->ev.ctx, s->conn, s, STOQ_STALL_SEND);
      n++;
    }
    ep->tx_cursor = NULL;
  }
  return n;
}
