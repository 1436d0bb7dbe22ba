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

#define STOQ_MAP_XSK "xsk_map"
#define STOQ_MAP_PORTS "stoq_ports"
#define STOQ_MAP_CONFIG "stoq_config"
#define STOQ_MAP_STATS "stoq_xdp_stats"

/** Most AF_XDP sockets (queues or workers) one interface can feed. */
#define STOQ_MAX_SOCKETS 64
/** Most UDP ports the node listens on. */
#define STOQ_MAX_PORTS 16
/** IPv6 extension headers walked before giving up (and passing the frame). */
#define STOQ_MAX_EXT_HEADERS 6
/** Workers whose steering is counted one by one (stats STOQ_STAT_WORKER_0 + n). */
#define STOQ_MAX_COUNTED_WORKERS 8

/** stoq_config[0]. */
struct stoq_config {
  __u32 workers; /* sockets in xsk_map when steering by CID; 0 = steer by receive queue */
  __u32 flags;   /* STOQ_F_* */
};

/** Steer by the worker id in the first byte of the QUIC destination CID. */
#define STOQ_F_STEER_BY_CID 0x1

/** Indices into the per-CPU stoq_xdp_stats array. */
enum stoq_stat {
  STOQ_STAT_REDIRECTED = 0,    /* QUIC datagram handed to an AF_XDP socket */
  STOQ_STAT_PASSED_NOT_IP,     /* not IPv6 or IPv4 (ARP, …) */
  STOQ_STAT_PASSED_NOT_UDP,    /* IPv6 but not UDP (ICMPv6/ND, TCP, …) */
  STOQ_STAT_PASSED_OTHER_PORT, /* UDP to a port the node does not own */
  STOQ_STAT_DROPPED_IPV4,      /* IPv4 UDP aimed at a node port: STOQ is IPv6 only */
  STOQ_STAT_PASSED_NO_SOCKET,  /* no AF_XDP socket at the chosen index */
  STOQ_STAT_PASSED_TRUNCATED,  /* frame ends inside a header */
  STOQ_STAT_PASSED_EXT_LIMIT,  /* more extension headers than STOQ_MAX_EXT_HEADERS */
  STOQ_STAT_PASSED_FRAGMENT,   /* a non-first IPv6 fragment */
  STOQ_STAT_STEERED_BY_CID,    /* the worker came from the destination CID */
  STOQ_STAT_WORKER_0,          /* … STOQ_STAT_WORKER_0 + n: steered to worker n */
  STOQ_STAT_MAX = STOQ_STAT_WORKER_0 + STOQ_MAX_COUNTED_WORKERS,
};

/** User-space names of the counters above, in enum order (the worker_n ones follow). */
#define STOQ_STAT_NAMES                                                                                                \
  "redirected", "passed_not_ip", "passed_not_udp", "passed_other_port", "dropped_ipv4", "passed_no_socket",            \
      "passed_truncated", "passed_ext_limit", "passed_fragment", "steered_by_cid"

#endif
