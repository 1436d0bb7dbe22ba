/*
 * Packets in and out of one connection: a received datagram into ngtcp2, the next run of
 * datagrams out of it (one GSO buffer, or one AF_XDP frame each), the close, the timers,
 * and how ngtcp2's errors become the STOQ_CONN_* outcomes.
 *
 * Why C: this is the per-packet path. stoq_conn_write interleaves nghttp3's body vectors with
 * ngtcp2's packet writer in one loop, reacting to ngtcp2's error codes between calls; in C it
 * touches no Swift object per packet.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <stdio.h>
#include <string.h>

#include <gnutls/gnutls.h>

/* RFC 9000 §20.1: 0x0100-0x01ff carry a TLS alert (RFC 9001 §4.8). */
static int is_crypto_error(uint64_t code) { return (code & ~(uint64_t)0xff) == 0x100; }

/* RFC 9000 §20.1. */
static const char *transport_error_name(uint64_t code) {
  static const char *names[] = {"NO_ERROR",
                                "INTERNAL_ERROR",
                                "CONNECTION_REFUSED",
                                "FLOW_CONTROL_ERROR",
                                "STREAM_LIMIT_ERROR",
                                "STREAM_STATE_ERROR",
                                "FINAL_SIZE_ERROR",
                                "FRAME_ENCODING_ERROR",
                                "TRANSPORT_PARAMETER_ERROR",
                                "CONNECTION_ID_LIMIT_ERROR",
                                "PROTOCOL_VIOLATION",
                                "INVALID_TOKEN",
                                "APPLICATION_ERROR",
                                "CRYPTO_BUFFER_EXCEEDED",
                                "KEY_UPDATE_ERROR",
                                "AEAD_LIMIT_REACHED",
                                "NO_VIABLE_PATH"};
  if (code < sizeof(names) / sizeof(names[0])) return names[code];
  return is_crypto_error(code) ? "CRYPTO_ERROR" : "unknown transport error";
}

/* The peer closed: say how, in its words (its reason phrase, printable bytes only). */
static void note_peer_close(stoq_conn *c) {
  ngtcp2_connection_close_error e;
  ngtcp2_conn_get_connection_close_error(c->q, &e);
  char reason[200];
  size_t n = 0;
  for (size_t i = 0; i < e.reasonlen && n + 1 < sizeof(reason); i++) {
    if (e.reason[i] >= 0x20 && e.reason[i] < 0x7f) reason[n++] = (char)e.reason[i];
  }
  reason[n] = 0;
  c->refused_by_peer = e.type == NGTCP2_CONNECTION_CLOSE_ERROR_CODE_TYPE_TRANSPORT &&
                       (is_crypto_error(e.error_code) || e.error_code == NGTCP2_CONNECTION_REFUSED);
  if (e.type == NGTCP2_CONNECTION_CLOSE_ERROR_CODE_TYPE_TRANSPORT && is_crypto_error(e.error_code)) {
    /* A TLS alert (RFC 9001 §4.8): its name says what the peer refused, e.g. our certificate. */
    const char *alert = gnutls_alert_get_name((gnutls_alert_description_t)(e.error_code & 0xff));
    conn_fail(c, "closed by the peer: CRYPTO_ERROR (0x%llx), TLS alert %u: %s%s%s", (unsigned long long)e.error_code,
              (unsigned)(e.error_code & 0xff), alert ? alert : "unknown", n ? ": " : "", reason);
  } else if (e.type == NGTCP2_CONNECTION_CLOSE_ERROR_CODE_TYPE_TRANSPORT) {
    conn_fail(c, "closed by the peer: %s (0x%llx)%s%s", transport_error_name(e.error_code),
              (unsigned long long)e.error_code, n ? ": " : "", reason);
  } else {
    conn_fail(c, "closed by the peer: application error 0x%llx%s%s", (unsigned long long)e.error_code, n ? ": " : "",
              reason);
  }
}

static int map_error(stoq_conn *c, int rv) {
  switch (rv) {
  case 0:
    return STOQ_CONN_OK;
  case NGTCP2_ERR_DRAINING:
    if (!c->errstr[0]) note_peer_close(c);
    return STOQ_CONN_DRAINING;
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
      ngtcp2_connection_close_error_set_transport_error_tls_alert(&c->last_error, ngtcp2_conn_get_tls_alert(c->q), NULL,
                                                                  0);
      c->has_error = 1;
    }
    if (!c->errstr[0] && c->is_server && c->tls_ctx && c->tls_ctx->client_auth == STOQ_CLIENT_AUTH_REQUIRED &&
        ngtcp2_conn_get_tls_alert(c->q) == GNUTLS_A_CERTIFICATE_REQUIRED) {
      /* GnuTLS ends the handshake itself when a required certificate is missing; any other
       * alert (no common ALPN, no common group…) happened before a certificate was due. */
      refuse_peer(c, "none was presented");
    }
    if (!c->errstr[0]) {
      /* Not a certificate verdict (those set errstr): name the alert the TLS stack sent. */
      unsigned alert = ngtcp2_conn_get_tls_alert(c->q);
      const char *name = gnutls_alert_get_name((gnutls_alert_description_t)alert);
      conn_fail(c, "TLS handshake failed: %s (alert %u)", name ? name : "unknown alert", alert);
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
  c->ep->now = now; /* the stall watch's clock (stoq_stall.c) */
  reading_conn = c;
  int rv = ngtcp2_conn_read_pkt(c->q, &path, &pi, pkt, len, now);
  reading_conn = NULL;
  /* Here, not in the handshake callback: GnuTLS is still on the stack there. A client waits
   * for the server's ticket, which it keeps for resumption. */
  if (rv == 0 && c->established && c->tls && (c->is_server || c->session.data)) release_tls(c);
  return map_error(c, rv);
}

static int same_addr(const struct sockaddr_in6 *a, const struct sockaddr *b) {
  const struct sockaddr_in6 *b6 = (const struct sockaddr_in6 *)b;
  return b6->sin6_family == AF_INET6 && a->sin6_port == b6->sin6_port && memcmp(&a->sin6_addr, &b6->sin6_addr, 16) == 0;
}

ssize_t stoq_conn_write(stoq_conn *c, uint8_t *buf, size_t cap, size_t max_pkts, size_t stride, size_t *segment_size,
                        struct sockaddr_in6 *remote, struct sockaddr_in6 *local, uint8_t *ecn, uint64_t now) {
  *segment_size = 0;
  c->ep->now = now;
  if (ngtcp2_conn_is_in_closing_period(c->q) || ngtcp2_conn_is_in_draining_period(c->q)) return 0;

  if (c->pending_len) {
    /* A packet that could not join the previous run goes out alone, first. */
    if (cap < c->pending_len) return 0;
    memcpy(buf, c->pending, c->pending_len);
    *segment_size = c->pending_len;
    *remote = c->pending_remote;
    *local = c->pending_local;
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
  uint8_t *p = buf;   /* where the next datagram goes */
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
      case NGTCP2_ERR_STREAM_SHUT_WR: {
        /* The peer asked for no more (STOP_SENDING) and ngtcp2 reset the sending half: no
         * acknowledgement will come, and none is waited for. */
        stoq_stream *s = c->is_server ? stream_find(c, sid) : NULL;
        if (s) unwatch_tx(s);
        nghttp3_conn_shutdown_stream_write(c->h3, sid);
        continue;
      }
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
    c->tx_built++;

    if (npkts == 0) {
      gso = (size_t)nwrite;
      *ecn = (uint8_t)pi.ecn;
      memcpy(remote, ps.path.remote.addr, sizeof(*remote));
      memcpy(local, ps.path.local.addr, sizeof(*local));
    } else if ((size_t)nwrite > gso || pi.ecn != *ecn || !same_addr(remote, ps.path.remote.addr) ||
               !same_addr(local, ps.path.local.addr)) {
      /* Cannot join this run: keep it for the next call. */
      memcpy(c->pending, dst, (size_t)nwrite);
      c->pending_len = (size_t)nwrite;
      c->pending_ecn = (uint8_t)pi.ecn;
      memcpy(&c->pending_remote, ps.path.remote.addr, sizeof(c->pending_remote));
      memcpy(&c->pending_local, ps.path.local.addr, sizeof(c->pending_local));
      break;
    }
    end = p + nwrite;
    p += stride ? stride : (size_t)nwrite;
    npkts++;
    if (npkts >= max_pkts || (size_t)nwrite < gso) break;
  }
  /* ngtcp2 0.12 paces at cwnd / smoothed_rtt × 1.25, and before its first RTT sample
   * smoothed_rtt is the 333 ms initial guess: a 1452-byte Initial, or a server's handshake
   * flight, then holds the next paced packet 25-30 ms. That packet is the client's Finished
   * and, on the server, the first response: every handshake paid it (gtlsclient against
   * gtlsserver too). ngtcp2 1.x paces only once its congestion controller has set a rate;
   * STOQ starts at the first RTT sample, and what was sent before it is charged then. */
  if (!c->paced) {
    ngtcp2_conn_stat st;
    ngtcp2_conn_get_conn_stat(c->q, &st);
    c->paced = st.first_rtt_sample_ts != UINT64_MAX;
  }
  if (c->paced) ngtcp2_conn_update_pkt_tx_time(c->q, now);
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
  if (n > 0) c->tx_built++;
  return n < 0 ? -1 : n;
}

int stoq_conn_goaway(stoq_conn *c) {
  if (!c->h3 || !c->is_server) return -1;
  return nghttp3_conn_shutdown(c->h3) == 0 ? 0 : -1;
}

uint64_t stoq_conn_streams_open(const stoq_conn *c) { return c->streams_open; }

uint64_t stoq_conn_expiry(stoq_conn *c) { return ngtcp2_conn_get_expiry(c->q); }

int stoq_conn_handle_expiry(stoq_conn *c, uint64_t now) {
  c->ep->now = now;
  return map_error(c, ngtcp2_conn_handle_expiry(c->q, now));
}

uint64_t stoq_conn_close_deadline(stoq_conn *c, uint64_t now) { return now + 3 * ngtcp2_conn_get_pto(c->q); }

int stoq_conn_initiate_key_update(stoq_conn *c, uint64_t now) { return ngtcp2_conn_initiate_key_update(c->q, now); }
uint64_t stoq_conn_rx_key_phase_packets(const stoq_conn *c, int phase) { return c->rx_key_phase[phase & 1]; }
uint64_t stoq_conn_rx_below_largest_dropped(const stoq_conn *c) { return c->rx_below_largest_dropped; }
