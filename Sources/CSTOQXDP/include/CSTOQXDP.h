/*
 * CSTOQXDP: STOQ's AF_XDP engine.
 *
 * Why C: this is the kernel-bypass packet path. One engine is one AF_XDP socket
 * bound to one NIC queue, with its own UMEM, owned by one worker thread. Receive
 * peeks the RX ring and parses Ethernet/IPv6/UDP in place (the worker reads the
 * QUIC payload straight from the UMEM frame); transmit lends a UMEM frame whose
 * payload the QUIC core writes directly, then prepends Ethernet/IPv6/UDP headers;
 * the UDP checksum is left to the kernel or NIC through TX metadata where the kernel
 * has it (Linux 6.8+) and the socket is in copy mode, else summed here. Everything is allocated at open: UMEM, a free stack of
 * transmit frames and a neighbour table sized for the worker's connections. The steady
 * state allocates nothing and makes at most one kick syscall per batch.
 *
 * Frame accounting: every UMEM frame is in exactly one place (fill ring / kernel,
 * held by the caller after receive, free for transmit, reserved, in flight on TX).
 * stoq_xsk_frames() reports each, so tests can prove nothing leaks.
 *
 * The XDP program (bpf/stoq_xdp.bpf.c) is attached by scripts/xdp-attach, which pins
 * its maps under /sys/fs/bpf/stoq/<iface>; the engine registers its socket and the
 * node's port, at the node's address (struct stoq_port), there by map name
 * (bpf/stoq_kern_user.h).
 */
#ifndef CSTOQXDP_H
#define CSTOQXDP_H

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>

/* struct stoq_shed_rule and STOQ_SHED_PREFIXES, shared with the XDP program. By path,
 * relative to this header: a target's headerSearchPath does not reach the Swift modules
 * that import it. */
#include "../../../bpf/stoq_kern_user.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Bytes of Ethernet + IPv6 + UDP header the engine writes in front of each payload. */
#define STOQ_XSK_HEADROOM 62

/** Peers a socket's neighbour table holds when stoq_xsk_config.neighbour_peers is 0, and the
 *  default of STOQDatapathXDP's XDPOptions.neighbourPeers: a worker's connections at
 *  network.max_connections' default, 32768 slots (1.25 MiB). Fewer evicted peers the worker
 *  still talked to (the old fixed 1024 slots answered 1022 of 2000). */
#define STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS 10000

enum stoq_xsk_zero_copy { STOQ_XSK_ZC_AUTO = 0, STOQ_XSK_ZC_ON = 1, STOQ_XSK_ZC_OFF = 2 };

typedef struct stoq_xsk_config {
  char ifname[16];
  uint32_t queue_id;
  /** The node's address and port: only datagrams to that address are steered and received; ::
   *  takes the port at every address, and replies leave from the address the peer sent to. */
  struct sockaddr_in6 local;
  uint32_t frame_size;     /* 2048 or 4096 */
  uint32_t frame_count;    /* UMEM frames: half receive (fill ring), half transmit */
  uint32_t ring_size;      /* RX, TX, fill and completion ring entries (power of two) */
  int zero_copy;           /* enum stoq_xsk_zero_copy */
  uint32_t busy_poll_usec; /* 0: interrupts; >0: SO_BUSY_POLL with SO_PREFER_BUSY_POLL */
  /** Directory of the pinned maps ("/sys/fs/bpf/stoq/<iface>"); the socket goes in its xsk_map. */
  char pin_dir[128];
  /** Index in xsk_map (the queue id when steering by queue, the worker id when by CID). */
  uint32_t xsk_map_index;
  /** Peers the neighbour table holds without evicting one (the worker's max_connections): it
   *  takes 2 x that slots rounded up to a power of two, 40 bytes each, 1024 to 2^20
   *  (stoq_xsk_neighbour_slots); 0: STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS. */
  uint32_t neighbour_peers;
} stoq_xsk_config;

/** One received datagram (the UDP payload, in the UMEM). Valid until stoq_xsk_rx_done. */
typedef struct stoq_xsk_rx {
  const uint8_t *data;
  uint32_t len;
  uint8_t ecn;
  struct sockaddr_in6 peer;
  struct in6_addr local;
} stoq_xsk_rx;

typedef struct stoq_xsk_counters {
  uint64_t rx_datagrams, rx_bytes, tx_datagrams, tx_bytes;
  uint64_t tx_kicks;           /* sendto wakeups */
  uint64_t rx_wakeups;         /* fill-ring wakeups (need_wakeup) */
  uint64_t rx_dropped;         /* frames that were not IPv6/UDP to our address and port, or malformed */
  uint64_t rx_checksum_errors; /* UDP checksum wrong: dropped */
  uint64_t tx_errors;          /* kicks the kernel refused with a real error */
  uint64_t tx_no_neighbour;    /* datagrams dropped: next-hop MAC unknown (kernel asked to resolve) */
  uint64_t neighbour_lookups;  /* peers missing from the table looked up in the kernel (route + next hop) */
  uint64_t neighbour_solicits; /* datagrams sent the kernel to make it resolve a peer (one a second a peer at most) */
  /* The kernel's own counters for this socket (XDP_STATISTICS). */
  uint64_t k_rx_dropped, k_rx_invalid_descs, k_tx_invalid_descs, k_rx_ring_full, k_fill_ring_empty, k_tx_ring_empty;
} stoq_xsk_counters;

/** Where every UMEM frame is right now. kernel_rx + held + tx_free + tx_reserved + tx_in_flight == total.
 *  Transmit frames are counted by slot (a slot is in flight until all its frames complete). */
typedef struct stoq_xsk_frames {
  uint32_t total, kernel_rx, held, tx_free, tx_reserved, tx_in_flight;
} stoq_xsk_frames;

typedef struct stoq_xsk stoq_xsk;

/** Creates UMEM + socket, binds (zero-copy if asked/possible, else copy), fills the fill
 *  ring, registers in the pinned xsk_map (refused when the pinned maps have another layout:
 *  stoq_xdp_check_maps). NULL with `err` ("step: reason") on failure. */
stoq_xsk *stoq_xsk_open(const stoq_xsk_config *cfg, char *err, size_t errlen);
/** Removes the socket from xsk_map (if still ours), closes it and frees the UMEM. */
void stoq_xsk_close(stoq_xsk *x);

/** 1 when the socket is bound zero-copy, 0 in copy mode. */
int stoq_xsk_zero_copy(const stoq_xsk *x);
/** The XDP attach mode of the interface's program: "native", "skb", "hw" or "none". */
const char *stoq_xsk_xdp_mode(const stoq_xsk *x);
/** 1 while an XDP program is attached to the interface and the socket's XSKMAP is still the one
 *  pinned (0: detached, or attached anew with new maps; 1 also when it cannot tell). */
int stoq_xsk_program_attached(stoq_xsk *x);
void stoq_xsk_local(const stoq_xsk *x, struct sockaddr_in6 *out);
/** Counters, with the kernel's XDP_STATISTICS refreshed. */
const stoq_xsk_counters *stoq_xsk_get_counters(stoq_xsk *x);
stoq_xsk_frames stoq_xsk_get_frames(const stoq_xsk *x);
/** Bytes of one transmit slot from its payload start: SLOT_FRAMES consecutive frames. */
uint32_t stoq_xsk_slot_size(const stoq_xsk *x);
/** Datagrams one transmit slot carries (one frame each). */
uint32_t stoq_xsk_slot_frames(const stoq_xsk *x);
/** Distance between consecutive datagrams in a slot (the frame size); each has room for
 *  stride - STOQ_XSK_HEADROOM payload bytes, less the TX metadata's 24 when it is reserved. */
uint32_t stoq_xsk_stride(const stoq_xsk *x);
/** 1 when the kernel or NIC fills in the UDP checksum (TX metadata), 0 when the engine sums it. */
int stoq_xsk_tx_checksum_offload(const stoq_xsk *x);
/** Why busy polling is off although busy_poll_usec asked for it ("setsockopt(OPTION): reason"),
 *  or "" when every option took (or none was asked for). */
const char *stoq_xsk_busy_poll_refused(const stoq_xsk *x);

/** Makes a waiting receive also return when `fd` (an eventfd; -1: none) becomes readable,
 *  and drains it. The socket does not own it. */
void stoq_xsk_set_wake_fd(stoq_xsk *x, int fd);
/** Frames `x` receives teach `transmitter`'s neighbour table instead of its own: a worker
 *  that reads several queues sends through one of them. Same thread only. */
void stoq_xsk_teach(stoq_xsk *x, stoq_xsk *transmitter);
/** The socket's file descriptor (to wait on several at once). */
int stoq_xsk_fd(const stoq_xsk *x);
/** Waits up to `timeout_ns` (0: do not wait) and returns up to `max` datagrams, or -errno. */
int stoq_xsk_receive(stoq_xsk *x, uint64_t timeout_ns, stoq_xsk_rx *out, int max);
/** Gives the frames of the last receive back to the fill ring. */
void stoq_xsk_rx_done(stoq_xsk *x);

/** A free transmit slot's first payload byte, or NULL when every slot is in flight. */
uint8_t *stoq_xsk_tx_reserve(stoq_xsk *x);
/** Frames and queues the reserved slot's run: datagram i (`segment_size` bytes, the last
 *  `len - i * stride`) starts at i * stride; all go to `to` with ECN bits `ecn`, from
 *  `from` (the address the peer wrote to, as the endpoint knows it; NULL or :: = the
 *  socket's local address, else the one `to` last wrote to). */
void stoq_xsk_tx_commit(stoq_xsk *x, size_t len, size_t segment_size, const struct sockaddr_in6 *to,
                        const struct in6_addr *from, uint8_t ecn);
/** Hands queued frames to the kernel and reaps completed ones. 0 or -errno. */
int stoq_xsk_flush(stoq_xsk *x);

/** The queues of `ifname` an AF_XDP socket can bind to, in the calling thread's network
 *  namespace: the active channels (ETHTOOL_GCHANNELS: the larger of rx + combined and tx +
 *  combined), or where the driver cannot tell, the queues it was allocated (netlink
 *  IFLA_NUM_RX_QUEUES); -errno (-ENODEV: no such interface). */
int stoq_xsk_interface_rx_queues(const char *ifname);

/** What is attached to `ifname`: writes the mode ("native", "skb", "hw", "multi" or
 *  "none") and the program id. 0 or -errno (-ENODEV: no such interface). */
int stoq_xdp_query(const char *ifname, char *mode, size_t modelen, uint32_t *prog_id);

/** Whether the maps pinned under `pin_dir` have this build's layout: their stoq_abi says
 *  STOQ_MAP_ABI_VERSION (bpf/stoq_kern_user.h). 0; -ENOENT when nothing is pinned there; -EPROTO
 *  when they have another version, or none (a build from before versions); else -errno. Every
 *  failure writes `err` ("map ABI: PATH: …", naming both versions and what to run). */
int stoq_xdp_check_maps(const char *pin_dir, char *err, size_t errlen);

/** Reads the pinned per-CPU counters under `pin_dir` (stoq_xdp_stats), summed over CPUs,
 *  into `out` (up to `max` entries, in enum stoq_stat order). Returns the count or -errno
 *  (-EPROTO: the maps have another layout, see stoq_xdp_check_maps). */
int stoq_xdp_read_stats(const char *pin_dir, uint64_t *out, int max);
/** The name of counter `index` ("worker_3" for the per-worker ones). */
const char *stoq_xdp_stat_name(int index, char *buf, size_t len);

/** Under an Initial flood: has the XDP program shed v1 Initials without a token steered to
 *  xsk_map slot `index`, by the plan in bpf/stoq_kern_user.h ("Shedding an Initial flood"):
 *  `n` rules (at most STOQ_SHED_PREFIXES), `shift` for everyone else; all shifts 0 sheds
 *  nothing. Writes the pinned stoq_shed map under `pin_dir` (of this build's layout, see
 *  stoq_xdp_check_maps). 0, or -1 with `err`. */
int stoq_xdp_shed_initials(const char *pin_dir, uint32_t index, const struct stoq_shed_rule *rules, unsigned n,
                           unsigned shift, char *err, size_t errlen);

/** Slots a socket's neighbour table takes for `peers` (0: STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS), 40
 *  bytes each: see stoq_xsk_config.neighbour_peers. */
uint32_t stoq_xsk_neighbour_slots(uint32_t peers);

/** Teaches the engine a neighbour (tests and callers that know it better). */
void stoq_xsk_learn_neighbour(stoq_xsk *x, const struct in6_addr *peer, const uint8_t mac[6]);

/** RFC 768/8200 UDP checksum over the IPv6 pseudo-header; exposed for tests. */
uint16_t stoq_xsk_udp6_checksum(const struct in6_addr *src, const struct in6_addr *dst, const uint8_t *udp, size_t len);

#ifdef __cplusplus
}
#endif
#endif
