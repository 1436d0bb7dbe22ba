/*
 * AF_XDP packet path: receive (Ethernet/IPv6/UDP parsed in place), transmit (headers and the
 * UDP checksum written in front of the QUIC payload, frames in slots), and the neighbour
 * table that gives each peer its next-hop MAC. See include/CSTOQXDP.h.
 *
 * Why C: this runs per frame over memory the kernel shares (the UMEM and its rings, with
 * libxdp's inline ring accessors); a checksum and a ring update per datagram with no bridging
 * and no allocation is what AF_XDP is for.
 */
#define _GNU_SOURCE
#include "stoq_xsk_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "stoq_kern_user.h"

/* ---- checksum (RFC 1071: ones' complement sum, computed in memory order) ---- */

static inline uint64_t csum_add(uint64_t sum, const uint8_t *p, size_t len) {
  while (len >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    sum += (w & 0xffffffffull) + (w >> 32);
    p += 8;
    len -= 8;
  }
  if (len >= 4) {
    uint32_t w;
    memcpy(&w, p, 4);
    sum += w;
    p += 4;
    len -= 4;
  }
  if (len >= 2) {
    uint16_t w;
    memcpy(&w, p, 2);
    sum += w;
    p += 2;
    len -= 2;
  }
  if (len) {
    uint16_t w = 0;
    memcpy(&w, p, 1); /* the odd byte is the high byte of a big-endian word */
    sum += w;
  }
  return sum;
}

static inline uint16_t csum_fold(uint64_t sum) {
  sum = (sum & 0xffffffffull) + (sum >> 32);
  sum = (sum & 0xffffffffull) + (sum >> 32);
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  return (uint16_t)sum;
}

/* Ones' complement sum (unfolded) of the IPv6 pseudo-header of a `len`-byte UDP datagram. */
static inline uint64_t pseudo_sum(const struct in6_addr *src, const struct in6_addr *dst, size_t len) {
  uint64_t sum = 0;
  sum = csum_add(sum, (const uint8_t *)src, 16);
  sum = csum_add(sum, (const uint8_t *)dst, 16);
  uint32_t l = htonl((uint32_t)len), nh = htonl(IPPROTO_UDP);
  return sum + l + nh;
}

/* Ones' complement sum of the pseudo-header and `len` bytes of UDP header + payload, in memory order. */
static inline uint16_t udp6_sum(const struct in6_addr *src, const struct in6_addr *dst, const uint8_t *udp,
                                size_t len) {
  return csum_fold(csum_add(pseudo_sum(src, dst, len), udp, len));
}

uint16_t stoq_xsk_udp6_checksum(const struct in6_addr *src, const struct in6_addr *dst, const uint8_t *udp,
                                size_t len) {
  uint16_t c = (uint16_t)~udp6_sum(src, dst, udp, len);
  if (c == 0) c = 0xffff; /* zero means "no checksum", which IPv6 forbids */
  return ntohs(c);
}

/* ---- neighbours: peer address -> next-hop MAC (and the local address it talked to) ---- */

/* Every address bit reaches the low bits the table's mask keeps (murmur3's fmix64 finaliser).
 * The multiply alone moved bits only upwards: addresses that differ in their last bytes, as a
 * prefix's hosts do, got a handful of hashes: 2000 peers in one /112 had 4 home slots of
 * 1024, 8 of 32768 (904 and 1954 now). */
static inline uint32_t neigh_hash(const struct in6_addr *a) {
  uint64_t lo, hi;
  memcpy(&lo, a, 8);
  memcpy(&hi, (const uint8_t *)a + 8, 8);
  uint64_t h = lo ^ (hi * 0x9E3779B97F4A7C15ull);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return (uint32_t)h;
}

static struct neigh *neigh_find(stoq_xsk *x, const struct in6_addr *peer) {
  uint32_t h = neigh_hash(peer);
  for (int i = 0; i < NEIGH_PROBE; i++) {
    struct neigh *n = &x->neigh[(h + i) & x->neigh_mask];
    if (!n->used) return NULL;
    if (memcmp(&n->peer, peer, 16) == 0) return n;
  }
  return NULL;
}

static void neigh_set(stoq_xsk *x, const struct in6_addr *peer, const uint8_t mac[6], const struct in6_addr *local) {
  uint32_t h = neigh_hash(peer);
  struct neigh *slot = NULL;
  for (int i = 0; i < NEIGH_PROBE; i++) {
    struct neigh *n = &x->neigh[(h + i) & x->neigh_mask];
    if (!n->used || memcmp(&n->peer, peer, 16) == 0) {
      slot = n;
      break;
    }
  }
  if (!slot) slot = &x->neigh[h & x->neigh_mask]; /* full probe window: replace the home slot */
  if (slot->used && memcmp(&slot->peer, peer, 16) == 0 && memcmp(slot->mac, mac, 6) == 0 &&
      (!local || memcmp(&slot->local, local, 16) == 0))
    return;
  slot->peer = *peer;
  memcpy(slot->mac, mac, 6);
  if (local) slot->local = *local;
  else if (!slot->used) slot->local = x->default_local;
  slot->used = 1;
}

void stoq_xsk_learn_neighbour(stoq_xsk *x, const struct in6_addr *peer, const uint8_t mac[6]) {
  neigh_set(x, peer, mac, NULL);
}

/* ---- a peer missing from the table: ask the kernel ---- */

/* Appends attribute `type` to the request `nh`. */
static void nl_attr(struct nlmsghdr *nh, uint16_t type, const void *data, uint16_t len) {
  struct rtattr *a = (struct rtattr *)((char *)nh + NLMSG_ALIGN(nh->nlmsg_len));
  a->rta_type = type;
  a->rta_len = (unsigned short)RTA_LENGTH(len);
  memcpy(RTA_DATA(a), data, len);
  nh->nlmsg_len = NLMSG_ALIGN(nh->nlmsg_len) + RTA_ALIGN(a->rta_len);
}

/* Sends one rtnetlink request and returns its answer (in nl_buf) if it is of type `want`; NULL
 * for an error (no route, no entry) or no answer. rtnetlink answers a request for one object
 * while the send runs, so the answer is there to read without waiting. */
static struct nlmsghdr *nl_ask(stoq_xsk *x, struct nlmsghdr *req, uint16_t want) {
  req->nlmsg_flags = NLM_F_REQUEST;
  req->nlmsg_seq = ++x->nl_seq;
  if (send(x->nl_fd, req, req->nlmsg_len, 0) < 0) return NULL;
  for (;;) {
    ssize_t n = recv(x->nl_fd, x->nl_buf, NL_BUF, MSG_DONTWAIT);
    if (n <= 0) return NULL;
    for (struct nlmsghdr *h = (struct nlmsghdr *)x->nl_buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n))
      if (h->nlmsg_seq == req->nlmsg_seq) return h->nlmsg_type == want ? h : NULL;
  }
}

/* Where a frame to `peer` goes first: the gateway of the kernel's route to it out of our
 * interface, or `peer` itself when it is on-link. 0, or -1 (no such route). */
static int next_hop(stoq_xsk *x, const struct in6_addr *peer, struct in6_addr *hop) {
  union {
    struct nlmsghdr nh;
    uint8_t b[NLMSG_SPACE(sizeof(struct rtmsg)) + 2 * RTA_SPACE(16)];
  } req;
  memset(&req, 0, sizeof(req));
  req.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg));
  req.nh.nlmsg_type = RTM_GETROUTE;
  struct rtmsg *rq = NLMSG_DATA(&req.nh);
  rq->rtm_family = AF_INET6;
  rq->rtm_dst_len = 128;
  uint32_t oif = (uint32_t)x->ifindex;
  nl_attr(&req.nh, RTA_DST, peer, 16);
  nl_attr(&req.nh, RTA_OIF, &oif, 4); /* the route out of this interface, as the frame leaves */
  struct nlmsghdr *h = nl_ask(x, &req.nh, RTM_NEWROUTE);
  if (!h) return -1;
  struct rtmsg *rt = NLMSG_DATA(h);
  if (rt->rtm_type != RTN_UNICAST) return -1;
  *hop = *peer;
  int alen = (int)RTM_PAYLOAD(h);
  for (struct rtattr *a = RTM_RTA(rt); RTA_OK(a, alen); a = RTA_NEXT(a, alen)) {
    if (a->rta_type == RTA_OIF && RTA_PAYLOAD(a) == 4 && *(uint32_t *)RTA_DATA(a) != oif) return -1;
    if (a->rta_type == RTA_GATEWAY && RTA_PAYLOAD(a) == 16) memcpy(hop, RTA_DATA(a), 16);
  }
  return 0;
}

/* The MAC of the kernel's neighbour entry for `hop` on our interface (one entry, RTM_GETNEIGH
 * without a dump: Linux 5.0+). 0, or -1 when it has none usable yet. */
static int hop_mac(stoq_xsk *x, const struct in6_addr *hop, uint8_t mac[6]) {
  union {
    struct nlmsghdr nh;
    uint8_t b[NLMSG_SPACE(sizeof(struct ndmsg)) + RTA_SPACE(16)];
  } req;
  memset(&req, 0, sizeof(req));
  req.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct ndmsg));
  req.nh.nlmsg_type = RTM_GETNEIGH;
  struct ndmsg *nq = NLMSG_DATA(&req.nh);
  nq->ndm_family = AF_INET6;
  nq->ndm_ifindex = x->ifindex;
  nl_attr(&req.nh, NDA_DST, hop, 16);
  struct nlmsghdr *h = nl_ask(x, &req.nh, RTM_NEWNEIGH);
  if (!h) return -1;
  struct ndmsg *nd = NLMSG_DATA(h);
  if (!(nd->ndm_state & (NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT))) return -1;
  int alen = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*nd)));
  for (struct rtattr *a = (struct rtattr *)((char *)nd + NLMSG_ALIGN(sizeof(*nd))); RTA_OK(a, alen);
       a = RTA_NEXT(a, alen)) {
    if (a->rta_type == NDA_LLADDR && RTA_PAYLOAD(a) == 6) {
      memcpy(mac, RTA_DATA(a), 6);
      return 0;
    }
  }
  return -1;
}

/* `peer`'s next-hop MAC from the kernel, learnt into the table: the route to it, then that next
 * hop's neighbour entry. An off-link peer's next hop is its router, whose entry the kernel
 * keeps, so an evicted one is answered at once rather than at its next datagram. Two short
 * requests, within the NEIGH_LOOKUPS budget; NULL when over it or unresolved. */
static struct neigh *lookup_neighbour(stoq_xsk *x, const struct in6_addr *peer) {
  uint64_t t = now_ns();
  if (t - x->lookup_window_start >= NEIGH_LOOKUP_WINDOW_NS) {
    x->lookup_window_start = t;
    x->lookups_in_window = 0;
  }
  if (x->lookups_in_window >= NEIGH_LOOKUPS) return NULL;
  x->lookups_in_window++;
  x->c.neighbour_lookups++;
  struct in6_addr hop;
  uint8_t mac[6];
  if (next_hop(x, peer, &hop) != 0 || hop_mac(x, &hop, mac) != 0) return NULL;
  neigh_set(x, peer, mac, NULL);
  return neigh_find(x, peer);
}

/* Asks the kernel to resolve `peer` (it does ND itself; the XDP program passes ICMPv6):
 * an empty datagram to the discard port from an ordinary socket. Once per SOLICIT_INTERVAL_NS
 * a peer, within the window's budget: every reply to an unresolved peer comes here. */
static void solicit(stoq_xsk *x, const struct in6_addr *peer) {
  if (x->solicit_fd < 0) return;
  uint64_t t = now_ns();
  struct solicited *last = &x->solicited[neigh_hash(peer) & (SOLICIT_SLOTS - 1)];
  if (last->at && t - last->at < SOLICIT_INTERVAL_NS && memcmp(&last->peer, peer, 16) == 0) return;
  if (t - x->solicit_window_start >= NEIGH_LOOKUP_WINDOW_NS) {
    x->solicit_window_start = t;
    x->solicits_in_window = 0;
  }
  if (x->solicits_in_window >= NEIGH_LOOKUPS) return;
  x->solicits_in_window++;
  last->peer = *peer;
  last->at = t;
  x->c.neighbour_solicits++;
  struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(9), .sin6_addr = *peer};
  (void)sendto(x->solicit_fd, "", 0, MSG_DONTWAIT, (struct sockaddr *)&sa, sizeof(sa));
}

/* ---- receive ---- */

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

/* Parses one frame; fills `out` and returns 1 for a UDP datagram to our port (at our address,
 * unless we listen on ::), 0 for anything else, -1 for a bad checksum. */
static int parse(stoq_xsk *x, uint8_t *p, uint32_t len, stoq_xsk_rx *out) {
  if (len < ETH_HLEN_ + IP6_HLEN + UDP_HLEN) return 0;
  uint32_t off = ETH_HLEN_;
  uint16_t proto = be16(p + 12);
  if (proto == 0x8100 || proto == 0x88a8) {
    proto = be16(p + 16);
    off += 4;
  }
  if (proto != 0x86dd || off + IP6_HLEN > len) return 0;
  uint8_t *ip6 = p + off;
  if ((ip6[0] >> 4) != 6) return 0;
  uint32_t end = off + IP6_HLEN + be16(ip6 + 4);
  if (end > len) return 0;
  uint8_t next = ip6[6];
  uint32_t l4 = off + IP6_HLEN;
  for (int i = 0; i < STOQ_MAX_EXT_HEADERS; i++) {
    if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
      if (l4 + 2 > end) return 0;
      next = p[l4];
      l4 += ((uint32_t)p[l4 + 1] + 1) * 8;
    } else if (next == IPPROTO_FRAGMENT) {
      return 0; /* a fragmented datagram needs reassembly: the kernel's job, not ours */
    } else {
      break;
    }
  }
  if (next != IPPROTO_UDP || l4 + UDP_HLEN > end) return 0;
  uint8_t *udp = p + l4;
  uint32_t ulen = be16(udp + 4);
  if (ulen < UDP_HLEN || l4 + ulen > end) return 0;
  if (memcmp(udp + 2, &x->port_be, 2) != 0) return 0;
  struct in6_addr src, dst;
  memcpy(&src, ip6 + 8, 16);
  memcpy(&dst, ip6 + 24, 16);
  /* A node on one address answers there only (the program steers no other; this is for a
   * program that did, or a datagram that came another way). */
  if (!is_any(&x->cfg.local.sin6_addr) && memcmp(&dst, &x->cfg.local.sin6_addr, 16) != 0) return 0;
  if (be16(udp + 6) == 0 || udp6_sum(&src, &dst, udp, ulen) != 0xffff) {
    x->c.rx_checksum_errors++;
    return -1;
  }
  out->data = udp + UDP_HLEN;
  out->len = ulen - UDP_HLEN;
  out->ecn = ((ip6[1] >> 4) & 0x3);
  memset(&out->peer, 0, sizeof(out->peer));
  out->peer.sin6_family = AF_INET6;
  out->peer.sin6_addr = src;
  memcpy(&out->peer.sin6_port, udp, 2);
  out->local = dst;
  /* reply through whoever delivered it, from where it was sent to */
  neigh_set(x->learner ? x->learner : x, &src, p + 6, &dst);
  return 1;
}

void stoq_xsk_set_wake_fd(stoq_xsk *x, int fd) { x->wake_fd = fd; }

void stoq_xsk_teach(stoq_xsk *x, stoq_xsk *transmitter) { x->learner = transmitter; }

int stoq_xsk_fd(const stoq_xsk *x) { return x->fd; }

int stoq_xsk_receive(stoq_xsk *x, uint64_t timeout_ns, stoq_xsk_rx *out, int max) {
  if (max > (int)x->cfg.ring_size) max = (int)x->cfg.ring_size;
  uint32_t idx = 0;
  uint32_t n = xsk_ring_cons__peek(&x->rx, (uint32_t)max, &idx);
  if (n == 0 && timeout_ns > 0) {
    struct pollfd pfd[2] = {{.fd = x->fd, .events = POLLIN}, {.fd = x->wake_fd, .events = POLLIN}};
    struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000ull),
                          .tv_nsec = (long)(timeout_ns % 1000000000ull)};
    int rc = ppoll(pfd, x->wake_fd >= 0 ? 2 : 1, &ts, NULL);
    if (rc < 0 && errno != EINTR) return -errno;
    if (rc > 0 && (pfd[1].revents & POLLIN)) {
      uint64_t v;
      if (read(x->wake_fd, &v, sizeof(v)) < 0) { /* already drained */
      }
    }
    n = xsk_ring_cons__peek(&x->rx, (uint32_t)max, &idx);
  } else if (n == 0 && xsk_ring_prod__needs_wakeup(&x->fill)) {
    x->c.rx_wakeups++;
    recvfrom(x->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
  }
  int k = 0;
  for (uint32_t i = 0; i < n; i++) {
    const struct xdp_desc *d = xsk_ring_cons__rx_desc(&x->rx, idx + i);
    uint64_t addr = xsk_umem__extract_addr(d->addr);
    x->held[x->n_held++] = addr - (addr % x->frame_size);
    x->kernel_rx--;
    int r = parse(x, (uint8_t *)x->area + addr, d->len, &out[k]);
    if (r == 1) {
      x->c.rx_datagrams++;
      x->c.rx_bytes += out[k].len;
      k++;
    } else if (r == 0) {
      x->c.rx_dropped++;
    }
  }
  if (n) xsk_ring_cons__release(&x->rx, n);
  if (n && k == 0) stoq_xsk_rx_done(x);
  return k;
}

void stoq_xsk_rx_done(stoq_xsk *x) {
  if (x->n_held == 0) return;
  uint32_t idx;
  /* The fill ring holds exactly rx_frames entries, so there is always room for what we hold. */
  uint32_t got = xsk_ring_prod__reserve(&x->fill, x->n_held, &idx);
  for (uint32_t i = 0; i < got; i++) *xsk_ring_prod__fill_addr(&x->fill, idx + i) = x->held[i];
  xsk_ring_prod__submit(&x->fill, got);
  x->kernel_rx += got;
  if (got < x->n_held) memmove(x->held, x->held + got, (x->n_held - got) * sizeof(uint64_t));
  x->n_held -= got;
  if (xsk_ring_prod__needs_wakeup(&x->fill)) {
    x->c.rx_wakeups++;
    recvfrom(x->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
  }
}

/* ---- transmit ---- */

static inline void slot_release(stoq_xsk *x, uint32_t slot) { x->slot_free[x->n_slot_free++] = slot; }

static void reap(stoq_xsk *x) {
  uint32_t idx;
  uint32_t n = xsk_ring_cons__peek(&x->comp, x->tx_frames, &idx);
  for (uint32_t i = 0; i < n; i++) {
    uint64_t addr = *xsk_ring_cons__comp_addr(&x->comp, idx + i);
    uint32_t slot = (uint32_t)((addr - x->tx_base) / x->slot_bytes);
    if (--x->slot_refs[slot] == 0) slot_release(x, slot);
  }
  if (n) xsk_ring_cons__release(&x->comp, n);
}

/* Tells the kernel there is TX work. Copy mode transmits at most 32 frames per call and
 * answers EAGAIN while more remain, so kick until it has taken them (bounded). */
static int kick(stoq_xsk *x, uint32_t pending) {
  if (!x->zc || xsk_ring_prod__needs_wakeup(&x->tx)) {
    for (uint32_t i = 0; i <= pending / 32 + 1; i++) {
      x->c.tx_kicks++;
      if (sendto(x->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0) break;
      if (errno == EAGAIN || errno == EINTR) continue;
      if (errno == EBUSY || errno == ENOBUFS || errno == ENETDOWN) break; /* try again next flush */
      x->c.tx_errors++;
      return -errno;
    }
  }
  return 0;
}

static inline uint8_t *slot_payload(stoq_xsk *x, uint32_t slot) {
  return (uint8_t *)x->area + x->tx_base + (uint64_t)slot * x->slot_bytes + x->tx_off + STOQ_XSK_HEADROOM;
}

uint8_t *stoq_xsk_tx_reserve(stoq_xsk *x) {
  if (x->has_reserved) return slot_payload(x, x->reserved);
  if (x->n_slot_free == 0) reap(x);
  if (x->n_slot_free == 0) return NULL;
  x->reserved = x->slot_free[--x->n_slot_free];
  x->has_reserved = 1;
  return slot_payload(x, x->reserved);
}

/* Writes Ethernet + IPv6 + UDP in front of the `len`-byte payload at f + STOQ_XSK_HEADROOM.
 * With checksum offload the UDP checksum field gets the pseudo-header's sum, which the
 * kernel or NIC completes over the datagram (as for any CHECKSUM_PARTIAL packet). */
static inline void frame_headers(stoq_xsk *x, uint8_t *f, size_t len, const struct neigh *nb,
                                 const struct in6_addr *src, const struct sockaddr_in6 *to, uint8_t ecn) {
  memcpy(f, nb->mac, 6);
  memcpy(f + 6, x->mac, 6);
  f[12] = 0x86;
  f[13] = 0xdd;
  uint8_t *ip6 = f + ETH_HLEN_;
  uint16_t plen = (uint16_t)(UDP_HLEN + len);
  ip6[0] = 0x60; /* version 6; traffic class = ECN bits; no flow label */
  ip6[1] = (uint8_t)((ecn & 3) << 4);
  ip6[2] = 0;
  ip6[3] = 0;
  ip6[4] = (uint8_t)(plen >> 8);
  ip6[5] = (uint8_t)plen;
  ip6[6] = IPPROTO_UDP;
  ip6[7] = 64;
  memcpy(ip6 + 8, src, 16);
  memcpy(ip6 + 24, &to->sin6_addr, 16);
  uint8_t *udp = ip6 + IP6_HLEN;
  memcpy(udp, &x->port_be, 2);
  memcpy(udp + 2, &to->sin6_port, 2);
  udp[4] = (uint8_t)(plen >> 8);
  udp[5] = (uint8_t)plen;
  udp[6] = 0;
  udp[7] = 0;
  uint16_t c;
  if (x->tx_csum_offload) {
    c = csum_fold(pseudo_sum(src, &to->sin6_addr, plen));
    struct stoq_tx_metadata *m = (struct stoq_tx_metadata *)(f - TX_META_LEN);
    m->flags = STOQ_TXMD_FLAGS_CHECKSUM;
    m->csum_start = ETH_HLEN_ + IP6_HLEN;
    m->csum_offset = 6;
  } else {
    c = (uint16_t)~udp6_sum(src, &to->sin6_addr, udp, plen);
    if (c == 0) c = 0xffff;
  }
  memcpy(udp + 6, &c, 2);
}

void stoq_xsk_tx_commit(stoq_xsk *x, size_t len, size_t segment_size, const struct sockaddr_in6 *to,
                        const struct in6_addr *from, uint8_t ecn) {
  if (!x->has_reserved) return;
  x->has_reserved = 0;
  uint32_t slot = x->reserved;
  size_t stride = x->frame_size, room = x->frame_size - x->tx_off - STOQ_XSK_HEADROOM;
  uint32_t nseg = (segment_size == 0 || len <= segment_size) ? 1 : (uint32_t)((len + stride - 1) / stride);
  struct neigh *nb = neigh_find(x, &to->sin6_addr);
  if (!nb) nb = lookup_neighbour(x, &to->sin6_addr);
  if (len == 0 || !nb || nseg > SLOT_FRAMES || (nseg == 1 ? len : segment_size) > room) {
    if (!nb) {
      x->c.tx_no_neighbour += nseg;
      solicit(x, &to->sin6_addr);
    } else if (len) {
      x->c.tx_errors += nseg;
    }
    slot_release(x, slot);
    return;
  }
  uint32_t fidx;
  if (xsk_ring_prod__reserve(&x->tx, nseg, &fidx) != nseg) {
    /* Ring full: hand the kernel what is queued, then try once more. */
    xsk_ring_prod__submit(&x->tx, x->tx_queued);
    x->tx_queued = 0;
    kick(x, x->cfg.ring_size);
    reap(x);
    if (xsk_ring_prod__reserve(&x->tx, nseg, &fidx) != nseg) {
      x->c.tx_errors += nseg;
      slot_release(x, slot);
      return;
    }
  }
  /* The endpoint's source first: the table's (learnt from any datagram of that peer, before
   * QUIC checked it) would let one spoofed datagram to another of the node's addresses move
   * every connection with that peer there. */
  const struct in6_addr *src = from && !is_any(from)             ? from
                               : is_any(&x->cfg.local.sin6_addr) ? &nb->local
                                                                 : &x->cfg.local.sin6_addr;
  uint64_t base = x->tx_base + (uint64_t)slot * x->slot_bytes;
  for (uint32_t i = 0; i < nseg; i++) {
    size_t plen = i + 1 < nseg ? segment_size : len - (size_t)i * stride;
    uint64_t addr = base + (uint64_t)i * stride + x->tx_off;
    frame_headers(x, (uint8_t *)x->area + addr, plen, nb, src, to, ecn);
    struct xdp_desc *d = xsk_ring_prod__tx_desc(&x->tx, fidx + i);
    d->addr = addr;
    d->len = (uint32_t)(STOQ_XSK_HEADROOM + plen);
    d->options = x->tx_csum_offload ? XDP_TX_METADATA : 0;
    x->c.tx_bytes += plen;
  }
  x->slot_refs[slot] = (uint16_t)nseg;
  x->tx_queued += nseg;
  x->c.tx_datagrams += nseg;
}

int stoq_xsk_flush(stoq_xsk *x) {
  uint32_t pending = x->tx_queued;
  if (pending) {
    xsk_ring_prod__submit(&x->tx, pending);
    x->tx_queued = 0;
  }
  int rc = 0;
  /* Kick for new frames, or for old ones the kernel has not taken yet (it said EBUSY). */
  uint32_t untaken = x->cfg.ring_size - xsk_prod_nb_free(&x->tx, x->cfg.ring_size);
  if (pending || untaken) rc = kick(x, untaken);
  reap(x);
  return rc;
}
