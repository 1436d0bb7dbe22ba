/*
 * What the CSTOQXDP files share, and nothing else includes: the socket's struct and the
 * helpers one file calls in another (hidden: none leaves the library).
 */
#ifndef STOQ_XSK_INTERNAL_H
#define STOQ_XSK_INTERNAL_H

#include "CSTOQXDP.h"

#include <linux/if_xdp.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <xdp/xsk.h>

#define STOQ_HIDDEN __attribute__((visibility("hidden")))

#ifndef SO_PREFER_BUSY_POLL
#define SO_PREFER_BUSY_POLL 69
#endif
#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif

#define ETH_HLEN_ 14
#define IP6_HLEN 40
#define UDP_HLEN 8
/* The neighbour table has a power of two of slots, at least twice the peers the worker may
 * hold connections with (stoq_xsk_config.neighbour_peers), so that a learnt peer is evicted
 * only by more peers than that: 40 bytes a slot (struct neigh), 1.25 MiB for the default
 * 10000 connections (STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS), at most NEIGH_MAX_SLOTS (40 MiB,
 * enough for 524288 peers). */
#define NEIGH_MIN_SLOTS 1024
#define NEIGH_MAX_SLOTS (1u << 20)
#define NEIGH_PROBE 8
/* A peer missing from the table is looked up in the kernel (its route, then its next hop's
 * neighbour entry: two rtnetlink requests on the worker thread), at most NEIGH_LOOKUPS times
 * per NEIGH_LOOKUP_WINDOW_NS per socket (320 a second, a few ms of the worker's time at
 * most); past that a reply to a missing peer is dropped as before (tx_no_neighbour). */
#define NEIGH_LOOKUPS 64
#define NEIGH_LOOKUP_WINDOW_NS 200000000ull
/* A peer the kernel cannot resolve either is solicited (solicit: an empty datagram to its
 * discard port, for the kernel to run Neighbour Discovery) at most once per
 * SOLICIT_INTERVAL_NS: the kernel retransmits its Neighbour Solicitations itself meanwhile
 * (RetransTimer, 1 s), and each datagram more would only wait in its queue for the address,
 * then go to the peer's port 9 once it resolves. SOLICIT_SLOTS remember whom, by address
 * (direct-mapped: a peer whose slot another took may be solicited sooner), and all peers
 * together are solicited at most NEIGH_LOOKUPS times per NEIGH_LOOKUP_WINDOW_NS, as many as
 * are looked up (a flood of Initials from spoofed sources is as many peers). */
#define SOLICIT_INTERVAL_NS 1000000000ull
#define SOLICIT_SLOTS 64
#define NL_BUF 8192
#define SLOT_FRAMES 16

/* TX metadata (Linux 6.8; XDP_UMEM_TX_METADATA_LEN 6.11), newer than Debian 12's headers
 * and libxdp 1.3.1, which is why the socket is set up here rather than by libxdp. The
 * metadata sits right before a frame's first byte; with XDP_TXMD_FLAGS_CHECKSUM the kernel
 * (copy mode: the skb goes out CHECKSUM_PARTIAL) or the NIC fills in the UDP checksum. */
#ifndef XDP_TX_METADATA
#define XDP_TX_METADATA (1 << 1)
#endif
#define STOQ_UMEM_TX_METADATA_LEN (1 << 2)
#define STOQ_TXMD_FLAGS_CHECKSUM (1 << 1)
struct stoq_umem_reg {
  uint64_t addr, len;
  uint32_t chunk_size, headroom, flags, tx_metadata_len;
};
struct stoq_tx_metadata {
  uint64_t flags;
  uint16_t csum_start, csum_offset; /* from the frame's first byte; from csum_start */
  uint32_t pad;
  uint64_t launch_time; /* unused; 6.15 made the request this large */
};
#define TX_META_LEN ((uint32_t)sizeof(struct stoq_tx_metadata))

struct neigh {
  struct in6_addr peer, local;
  uint8_t mac[6];
  uint8_t used;
};
_Static_assert(sizeof(struct neigh) == 40, "the slot size docs/deployment.md gives");

struct stoq_xsk {
  stoq_xsk_config cfg;
  int ifindex;
  uint8_t mac[6];
  struct in6_addr default_local;
  uint16_t port_be;
  uint32_t prog_id;
  const char *mode;
  int zc;

  void *area;
  size_t area_len;
  uint32_t frame_size, nframes, rx_frames, tx_frames;
  int fd;
  int bound;
  struct xsk_ring_prod fill, tx;
  struct xsk_ring_cons comp, rx;
  void *ring_map[4]; /* fill, completion, rx, tx */
  size_t ring_len[4];
  int map_fd;
  uint32_t map_id; /* the kernel's id of that map, to notice a new one pinned in its place */
  int alone;       /* the program was attached alone (bpftool), not in libxdp's dispatcher */
  /* Transmit frames start tx_off bytes into their UMEM frame (room for TX metadata when
   * the UMEM reserved it); tx_csum_offload: the kernel or NIC sums the UDP checksum. */
  uint32_t tx_off;
  int tx_csum_offload;
  char busy_poll_refused[96]; /* the busy-poll option the kernel refused and why; "" if none */

  /* Transmit frames come in slots of SLOT_FRAMES consecutive frames, so that the QUIC
   * core can write a run of datagrams into one slot, one frame apart (stride). A slot is
   * free again when the completion ring has returned every frame it sent. */
  uint64_t tx_base;
  uint32_t nslots, slot_bytes;
  uint32_t *slot_free;
  uint32_t n_slot_free;
  uint16_t *slot_refs;
  uint32_t reserved;
  int has_reserved;
  uint32_t tx_queued;
  uint64_t *held;
  uint32_t n_held;
  uint32_t kernel_rx;

  stoq_xsk_counters c;
  struct neigh *neigh;
  uint32_t neigh_mask; /* slots - 1 */
  int nl_fd;           /* rtnetlink, for the lookups */
  uint32_t nl_seq;
  uint64_t lookup_window_start; /* NEIGH_LOOKUPS per NEIGH_LOOKUP_WINDOW_NS */
  uint32_t lookups_in_window;
  uint8_t *nl_buf;
  int solicit_fd;
  struct solicited {
    struct in6_addr peer;
    uint64_t at; /* now_ns() of its last solicitation; 0: none */
  } solicited[SOLICIT_SLOTS];
  uint64_t solicit_window_start; /* NEIGH_LOOKUPS solicitations per NEIGH_LOOKUP_WINDOW_NS */
  uint32_t solicits_in_window;
  int wake_fd;       /* another worker's nudge (eventfd), or -1 */
  stoq_xsk *learner; /* whose neighbour table received frames teach (itself, or its group's transmitter) */
};

static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline int is_any(const struct in6_addr *a) {
  static const struct in6_addr any = IN6ADDR_ANY_INIT;
  return memcmp(a, &any, sizeof(any)) == 0;
}

/* Control plane (stoq_xdp_ctl.c): what the kernel says about an interface. */
/* The interface's first global IPv6 address. 0 or -1. */
STOQ_HIDDEN int interface_address(const char *ifname, struct in6_addr *out);
/* Sets x->mode and x->prog_id from the XDP program attached to x->ifindex. */
STOQ_HIDDEN void query_mode(stoq_xsk *x);
STOQ_HIDDEN int kernel_at_least(int major, int minor);

#endif
