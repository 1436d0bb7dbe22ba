/*
 * Stateless packets: what an endpoint reads or writes before, or without, a connection —
 * the connection IDs of any datagram, Version Negotiation, Stateless Reset.
 *
 * Why C: the packet formats and the reset-token derivation are ngtcp2's and ngtcp2_crypto's;
 * these wrappers keep ngtcp2's cid and header structs out of Swift.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <string.h>

#include <ngtcp2/ngtcp2_crypto.h>

int stoq_pkt_decode_ids(const uint8_t *pkt, size_t len, size_t short_dcidlen, stoq_pkt_ids *out) {
  ngtcp2_version_cid vc;
  int rv = ngtcp2_pkt_decode_version_cid(&vc, pkt, len, short_dcidlen);
  if (rv != 0 && rv != NGTCP2_ERR_VERSION_NEGOTIATION) return STOQ_PKT_INVALID;
  if (vc.dcidlen > STOQ_MAX_CIDLEN) return STOQ_PKT_INVALID;
  /* ngtcp2 also speaks QUIC's drafts and v2's; a node speaks v1 alone, the version its flood
   * rule (stoq_quic_sheddable_initial) knows, and negotiates the others away. Version
   * Negotiation answers only a datagram a client's first could be (RFC 9000 §6.1). */
  if (rv == 0 && (pkt[0] & 0x80) && vc.version != 0 && vc.version != NGTCP2_PROTO_VER_V1) {
    if (len < NGTCP2_MAX_UDP_PAYLOAD_SIZE) return STOQ_PKT_INVALID;
    rv = NGTCP2_ERR_VERSION_NEGOTIATION;
  }
  out->version = vc.version;
  out->is_long = (pkt[0] & 0x80) != 0;
  out->dcidlen = vc.dcidlen;
  out->scidlen = vc.scidlen;
  if (vc.dcidlen) memcpy(out->dcid, vc.dcid, vc.dcidlen);
  if (vc.scidlen) memcpy(out->scid, vc.scid, vc.scidlen);
  return rv == NGTCP2_ERR_VERSION_NEGOTIATION ? STOQ_PKT_VERSION_NEGOTIATION : STOQ_PKT_OK;
}

int stoq_pkt_sheddable_initial(const uint8_t *pkt, size_t len) { return stoq_quic_sheddable_initial(pkt, pkt + len); }

ssize_t stoq_pkt_write_version_negotiation(uint8_t *buf, size_t cap, const stoq_pkt_ids *ids) {
  uint32_t sv[] = {NGTCP2_PROTO_VER_V1};
  uint8_t r;
  stoq_random(&r, 1);
  /* Our reply swaps the connection IDs. */
  return ngtcp2_pkt_write_version_negotiation(buf, cap, r, ids->scid, ids->scidlen, ids->dcid, ids->dcidlen, sv,
                                              sizeof(sv) / sizeof(sv[0]));
}

ssize_t stoq_pkt_write_refusal(uint8_t *buf, size_t cap, const uint8_t *pkt, size_t len, const char *reason,
                               size_t reasonlen) {
  ngtcp2_pkt_hd hd;
  int rv = ngtcp2_accept(&hd, pkt, len);
  if (rv != 0 && rv != NGTCP2_ERR_RETRY) return 0;
  if (cap > len * 3) cap = len * 3;
  /* Our reply swaps the connection IDs; the client's DCID derives the Initial keys. */
  ssize_t n = ngtcp2_crypto_write_connection_close(buf, cap, hd.version, &hd.scid, &hd.dcid, NGTCP2_CONNECTION_REFUSED,
                                                   (const uint8_t *)reason, reasonlen);
  return n < 0 ? -1 : n;
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
