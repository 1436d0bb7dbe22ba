/*
 * Shared by bpf/stoq_xdp.bpf.c and user space (CSTOQXDP, scripts, tests): map
 * names, structs and counter indices. The single source of truth for both sides.
 */
#ifndef STOQ_KERN_USER_H
#define STOQ_KERN_USER_H

#include <linux/types.h>

/*
 * Connection ID -> worker: the one rule every steering point follows. The node puts the
 * id of the worker that owns a connection in byte STOQ_CID_WORKER_BYTE of every CID it
 * issues (make_cid in CNgtcp2); the XDP program (stoq_xdp.bpf.c), the reuseport program
 * (CSTOQURing) and the worker hand-off (STOQWorker's Handoff.swift) read that byte from a
 * datagram's destination CID and pick worker `byte % workers`. Where the DCID starts is
 * QUIC's invariant header (RFC 8999): short header after the first byte; long header after
 * the first byte, the 4-byte version and the 1-byte DCID length. Plain integer literals so
 * that classic BPF, BPF C and Swift (through a C module) all read the same numbers.
 */
/** The first byte's header-form bit: set = long header. */
#define STOQ_QUIC_LONG_HEADER_BIT 0x80
/** Long header: offset of the DCID length byte (0 = no DCID to steer by). */
#define STOQ_QUIC_LONG_DCID_LEN_OFFSET 5
/** Long header: offset of the DCID. */
#define STOQ_QUIC_LONG_DCID_OFFSET 6
/** Short header: offset of the DCID. */
#define STOQ_QUIC_SHORT_DCID_OFFSET 1
/** Byte of a node-issued CID that holds the worker id. */
#define STOQ_CID_WORKER_BYTE 0
/** Offsets of the worker byte in a datagram (DCID offset + STOQ_CID_WORKER_BYTE). */
#define STOQ_QUIC_LONG_WORKER_OFFSET 6
#define STOQ_QUIC_SHORT_WORKER_OFFSET 1
_Static_assert(STOQ_QUIC_LONG_WORKER_OFFSET == STOQ_QUIC_LONG_DCID_OFFSET + STOQ_CID_WORKER_BYTE,
               "long-header worker byte");
_Static_assert(STOQ_QUIC_SHORT_WORKER_OFFSET == STOQ_QUIC_SHORT_DCID_OFFSET + STOQ_CID_WORKER_BYTE,
               "short-header worker byte");

/*
 * A QUIC v1 Initial without a token (RFC 9000 §17.2.2): what a new client sends first, what a
 * client answered with Retry never sends again, and what an Initial flood is made of. Under
 * such a flood the node's socket filter (CSTOQURing) or XDP program sheds a share of these in
 * the kernel, and the endpoint counts the ones that reach it with stoq_quic_sheddable_initial
 * below: one rule, these offsets, for all. The first byte's form bit and long-packet type (mask 0xb0; the
 * fixed bit may be greased) say Initial; the version is 1; the SCID length follows the DCID,
 * and the token length (a varint, 0x00 = none) follows the SCID.
 */
#define STOQ_QUIC_INITIAL_MASK 0xb0
#define STOQ_QUIC_INITIAL_V1 0x80
#define STOQ_QUIC_VERSION_OFFSET 1
#define STOQ_QUIC_VERSION_1 1
/** Offset of the SCID length byte, plus the DCID length. */
#define STOQ_QUIC_LONG_SCID_LEN_OFFSET 6
/** Offset of a v1 Initial's token length, plus the DCID and SCID lengths. */
#define STOQ_QUIC_INITIAL_TOKEN_LEN_OFFSET 7

/**
 * Whether a datagram from `p` to `end` may be shed: a v1 Initial without a token, or one so
 * short that a byte the rule reads lies past its end (the kernel's classic BPF drops a
 * datagram it reads past; nothing valid is that short). Every read is checked against `end`
 * right before it, the way the BPF verifier wants packet reads checked.
 */
static inline __attribute__((always_inline)) int stoq_quic_sheddable_initial(const __u8 *p, const __u8 *end) {
  if (p + 1 > end || (p[0] & STOQ_QUIC_INITIAL_MASK) != STOQ_QUIC_INITIAL_V1) return 0;
  const __u8 *v = p + STOQ_QUIC_VERSION_OFFSET;
  if (v + 4 > end) return 1;
  if (((__u32)v[0] << 24 | (__u32)v[1] << 16 | (__u32)v[2] << 8 | v[3]) != STOQ_QUIC_VERSION_1) return 0;
  if (p + STOQ_QUIC_LONG_DCID_LEN_OFFSET + 1 > end) return 1;
  __u32 ids = p[STOQ_QUIC_LONG_DCID_LEN_OFFSET];
  const __u8 *scid_len = p + STOQ_QUIC_LONG_SCID_LEN_OFFSET + ids;
  if (scid_len + 1 > end) return 1;
  ids += *scid_len;
  const __u8 *token_len = p + STOQ_QUIC_INITIAL_TOKEN_LEN_OFFSET + ids;
  if (token_len + 1 > end) return 1;
  return *token_len == 0;
}

/*
 * Shedding an Initial flood: the plan a worker's datapath follows (STOQDatapath's
 * InitialShedPlan). Sheddable Initials from the /64 of the first rule that matches keep one in
 * 2^rule.shift at random, the others one in 2^shift; shift 0 keeps all. The io_uring datapath
 * compiles it into a socket filter (CSTOQURing); the XDP program reads it from stoq_shed, one
 * entry per AF_XDP socket (xsk_map index), written by CSTOQXDP.
 */
/** Most /64s one plan singles out. */
#define STOQ_SHED_PREFIXES 4
struct stoq_shed_rule {
  __u64 prefix; /* an address's first 64 bits, as a number (network byte order read as one) */
  __u32 shift;
  __u32 pad;
};
/** Keeping one in 2^shift: a random 32-bit draw is kept when its bits under this mask are 0. */
static inline __attribute__((always_inline)) __u32 stoq_shed_keep_mask(__u32 shift) {
  return shift >= 32 ? 0xffffffffu : (1u << shift) - 1;
}
struct stoq_shed {
  struct stoq_shed_rule rules[STOQ_SHED_PREFIXES];
  __u32 count; /* rules in use */
  __u32 shift; /* everyone else */
};

/*
 * The maps' layout version: bump it whenever a map's key, value, size or meaning changes (a
 * struct or flag here, a counter's index, a map added, removed or renamed). A node and maps
 * pinned by another build would otherwise misread each other without a word: 971a56b made
 * stoq_ports' value a 16-byte struct stoq_port, and a node from before that writes its 1-byte
 * value there, of which the kernel copies 16 bytes: the port is steered at a garbage address. The program
 * carries the version as the entry count of its stoq_abi map (stoq_maps.h), pinned with the
 * others, so no one has to write it and libbpf refuses to reuse a pinned stoq_abi of another
 * size; CSTOQXDP (stoq_xdp_check_maps) and scripts/xdp-attach refuse pins whose stoq_abi is
 * another version, or missing (a build from before versions).
 * 1: stoq_ports -> struct stoq_port; stats through passed_other_address.
 */
#define STOQ_MAP_ABI_VERSION 1

#define STOQ_MAP_ABI "stoq_abi"
#define STOQ_MAP_XSK "xsk_map"
#define STOQ_MAP_PORTS "stoq_ports"
#define STOQ_MAP_CONFIG "stoq_config"
#define STOQ_MAP_STATS "stoq_xdp_stats"
#define STOQ_MAP_SHED "stoq_shed"

/** Most AF_XDP sockets (queues or workers) one interface can feed. */
#define STOQ_MAX_SOCKETS 64
/** Most UDP ports the node listens on. */
#define STOQ_MAX_PORTS 16
/** IPv6 extension headers walked before giving up (and passing the frame). */
#define STOQ_MAX_EXT_HEADERS 6
/** Workers whose steering is counted one by one (stats STOQ_STAT_WORKER_0 + n). */
#define STOQ_MAX_COUNTED_WORKERS 8

/**
 * stoq_ports' value: where the node listens on that port. Written as all zero by
 * scripts/xdp-attach (--ports), then by stoq-node when it opens its sockets: its listen_addr,
 * or all zero for [::]. The program steers a datagram to the port only when it is to that
 * address (all zero: to any of the interface's), so a routed range, a secondary address or
 * another service on the same port at another address stays the kernel's.
 */
struct stoq_port {
  __u32 addr[4]; /* IPv6 address, network byte order; all zero: every address */
};

/** stoq_config[0]. */
struct stoq_config {
  __u32 workers; /* sockets in xsk_map when steering by CID; 0 = steer by receive queue */
  __u32 flags;   /* STOQ_F_* */
};

/** Steer by the worker id in the first byte of the QUIC destination CID. */
#define STOQ_F_STEER_BY_CID 0x1

/** Indices into the per-CPU stoq_xdp_stats array. */
enum stoq_stat {
  STOQ_STAT_REDIRECTED = 0,       /* QUIC datagram handed to an AF_XDP socket */
  STOQ_STAT_PASSED_NOT_IP,        /* not IPv6 or IPv4 (ARP, …) */
  STOQ_STAT_PASSED_NOT_UDP,       /* IPv6 but not UDP (ICMPv6/ND, TCP, …) */
  STOQ_STAT_PASSED_OTHER_PORT,    /* UDP to a port the node does not own */
  STOQ_STAT_PASSED_IPV4,          /* IPv4 UDP to a node port: the node is IPv6 only, the host may not be */
  STOQ_STAT_PASSED_NO_SOCKET,     /* no AF_XDP socket at the chosen index */
  STOQ_STAT_PASSED_TRUNCATED,     /* frame ends inside a header */
  STOQ_STAT_PASSED_EXT_LIMIT,     /* more extension headers than STOQ_MAX_EXT_HEADERS */
  STOQ_STAT_PASSED_FRAGMENT,      /* a non-first IPv6 fragment */
  STOQ_STAT_STEERED_BY_CID,       /* the worker came from the destination CID */
  STOQ_STAT_SHED_INITIAL,         /* a v1 Initial without a token, shed under a flood (stoq_shed) */
  STOQ_STAT_PASSED_OTHER_ADDRESS, /* IPv6 UDP to a node port at an address the node does not listen on */
  STOQ_STAT_WORKER_0,             /* … STOQ_STAT_WORKER_0 + n: steered to worker n */
  STOQ_STAT_MAX = STOQ_STAT_WORKER_0 + STOQ_MAX_COUNTED_WORKERS,
};

/** User-space names of the counters above, in enum order (the worker_n ones follow). */
#define STOQ_STAT_NAMES                                                                                                \
  "redirected", "passed_not_ip", "passed_not_udp", "passed_other_port", "passed_ipv4", "passed_no_socket",             \
      "passed_truncated", "passed_ext_limit", "passed_fragment", "steered_by_cid", "shed_initial",                     \
      "passed_other_address"

#endif
