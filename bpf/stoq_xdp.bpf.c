// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * STOQ's XDP program: QUIC datagrams for the node's UDP ports, at the address it listens on
 * there (or at any, for a node on [::]), go to an AF_XDP socket; everything else goes to the
 * kernel untouched (ND, SSH, the admin API, other UDP, the port at the host's other addresses).
 * IPv4 passes too, even to a node port: the node is IPv6 only and never sees it, but another
 * service on the host may use IPv4 on that port. Every verdict is counted.
 *
 * Steering: by the receiving queue. With STOQ_F_STEER_BY_CID the socket is chosen by the
 * worker id in the QUIC destination connection ID (the layout is in stoq_kern_user.h), the
 * way katran picks a server from a CID; no tool sets it, since stoq-node registers queue q's
 * socket at xsk_map[q] and the kernel drops a frame redirected to a socket of another queue.
 *
 * Under an Initial flood the worker a datagram is steered to may have asked (stoq_shed) for
 * a share of the v1 Initials without a token to be dropped here, before any copy.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "stoq_maps.h"

#define VLAN_HLEN 4

static __always_inline void count(__u32 stat) {
  __u64 *v = bpf_map_lookup_elem(&stoq_xdp_stats, &stat);
  if (v) *v += 1;
}

static __always_inline int pass(__u32 stat) {
  count(stat);
  return XDP_PASS;
}

static __always_inline int is_node_port(__u16 port) { return bpf_map_lookup_elem(&stoq_ports, &port) != NULL; }

/* Whether `owner` (a node port's stoq_ports entry) listens at `dst`: at that address, or at
 * every one when its address is all zero. */
static __always_inline int listens_at(const struct stoq_port *owner, const struct in6_addr *dst) {
  if ((owner->addr[0] | owner->addr[1] | owner->addr[2] | owner->addr[3]) == 0) return 1;
  return owner->addr[0] == dst->in6_u.u6_addr32[0] && owner->addr[1] == dst->in6_u.u6_addr32[1] &&
         owner->addr[2] == dst->in6_u.u6_addr32[2] && owner->addr[3] == dst->in6_u.u6_addr32[3];
}

/* Whether to drop the QUIC datagram at q, from ip6, steered to socket `index`: the rule in
 * stoq_kern_user.h ("Shedding an Initial flood"). */
static __always_inline int shed(const struct ipv6hdr *ip6, const __u8 *q, const __u8 *end, __u32 index) {
  struct stoq_shed *plan = bpf_map_lookup_elem(&stoq_shed, &index);
  if (!plan || (plan->count == 0 && plan->shift == 0)) return 0;
  if (!stoq_quic_sheddable_initial(q, end)) return 0;
  __u64 prefix = (__u64)bpf_ntohl(ip6->saddr.in6_u.u6_addr32[0]) << 32 | bpf_ntohl(ip6->saddr.in6_u.u6_addr32[1]);
  __u32 shift = plan->shift;
#pragma unroll
  for (int i = 0; i < STOQ_SHED_PREFIXES; i++) {
    if (i < plan->count && plan->rules[i].prefix == prefix) {
      shift = plan->rules[i].shift;
      break;
    }
  }
  if (shift == 0) return 0;
  return (bpf_get_prandom_u32() & stoq_shed_keep_mask(shift)) != 0;
}

SEC("xdp")
int stoq_xdp(struct xdp_md *ctx) {
  void *data = (void *)(long)ctx->data;
  void *end = (void *)(long)ctx->data_end;
  struct ethhdr *eth = data;
  if ((void *)(eth + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
  __u16 proto = eth->h_proto;
  void *l3 = eth + 1;
  if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
    if (l3 + VLAN_HLEN > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
    proto = *(__u16 *)(l3 + 2);
    l3 += VLAN_HLEN;
  }

  if (proto == bpf_htons(ETH_P_IP)) {
    struct iphdr *ip4 = l3;
    if ((void *)(ip4 + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
    if (ip4->protocol != IPPROTO_UDP) return pass(STOQ_STAT_PASSED_NOT_UDP);
    __u32 ihl = ip4->ihl * 4;
    if (ihl < sizeof(*ip4)) return pass(STOQ_STAT_PASSED_TRUNCATED);
    struct udphdr *udp4 = l3 + ihl;
    if ((void *)(udp4 + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
    return pass(is_node_port(bpf_ntohs(udp4->dest)) ? STOQ_STAT_PASSED_IPV4 : STOQ_STAT_PASSED_OTHER_PORT);
  }
  if (proto != bpf_htons(ETH_P_IPV6)) return pass(STOQ_STAT_PASSED_NOT_IP);

  struct ipv6hdr *ip6 = l3;
  if ((void *)(ip6 + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
  __u8 next = ip6->nexthdr;
  void *l4 = ip6 + 1;

  /* Walk a bounded chain of extension headers. */
#pragma unroll
  for (int i = 0; i < STOQ_MAX_EXT_HEADERS; i++) {
    if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
      __u8 *h = l4;
      if ((void *)(h + 2) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
      next = h[0];
      l4 += ((__u32)h[1] + 1) * 8;
    } else if (next == IPPROTO_FRAGMENT) {
      __u8 *h = l4;
      if ((void *)(h + 8) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
      __u16 off = bpf_ntohs(*(__u16 *)(h + 2)) & 0xfff8;
      if (off != 0) return pass(STOQ_STAT_PASSED_FRAGMENT);
      next = h[0];
      l4 += 8;
    } else {
      break;
    }
  }
  if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS || next == IPPROTO_FRAGMENT)
    return pass(STOQ_STAT_PASSED_EXT_LIMIT);
  if (next != IPPROTO_UDP) return pass(STOQ_STAT_PASSED_NOT_UDP);

  struct udphdr *udp = l4;
  if ((void *)(udp + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
  __u16 port = bpf_ntohs(udp->dest);
  struct stoq_port *owner = bpf_map_lookup_elem(&stoq_ports, &port);
  if (!owner) return pass(STOQ_STAT_PASSED_OTHER_PORT);
  if (!listens_at(owner, &ip6->daddr)) return pass(STOQ_STAT_PASSED_OTHER_ADDRESS);

  __u32 index = ctx->rx_queue_index;
  __u32 zero = 0;
  struct stoq_config *cfg = bpf_map_lookup_elem(&stoq_config, &zero);
  if (cfg && (cfg->flags & STOQ_F_STEER_BY_CID) && cfg->workers > 0) {
    __u8 *q = (__u8 *)(udp + 1);
    if ((void *)(q + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
    __u8 worker;
    if (q[0] & STOQ_QUIC_LONG_HEADER_BIT) {
      if ((void *)(q + STOQ_QUIC_LONG_WORKER_OFFSET + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
      if (q[STOQ_QUIC_LONG_DCID_LEN_OFFSET] == 0) return pass(STOQ_STAT_PASSED_TRUNCATED); /* no DCID to steer by */
      worker = q[STOQ_QUIC_LONG_WORKER_OFFSET];
    } else {
      if ((void *)(q + STOQ_QUIC_SHORT_WORKER_OFFSET + 1) > end) return pass(STOQ_STAT_PASSED_TRUNCATED);
      worker = q[STOQ_QUIC_SHORT_WORKER_OFFSET];
    }
    index = worker % cfg->workers;
    count(STOQ_STAT_STEERED_BY_CID);
  }
  if (shed(ip6, (__u8 *)(udp + 1), end, index)) {
    count(STOQ_STAT_SHED_INITIAL);
    return XDP_DROP;
  }
  if (index < STOQ_MAX_COUNTED_WORKERS) count(STOQ_STAT_WORKER_0 + index);

  /* No socket at that index: the flag makes the helper return XDP_PASS. */
  int verdict = bpf_redirect_map(&xsk_map, index, XDP_PASS);
  count(verdict == XDP_REDIRECT ? STOQ_STAT_REDIRECTED : STOQ_STAT_PASSED_NO_SOCKET);
  return verdict;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
