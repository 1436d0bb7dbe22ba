/*
 * CSTOQURing: STOQ's io_uring UDP engine.
 *
 * Why C: this is the packet path. One engine is one socket and one ring, owned by
 * one worker thread: receive is a single multishot recvmsg over a provided-buffer
 * ring (a buffer holds a full GRO batch: up to 65,527 bytes of payload), transmit is
 * SENDMSG from a fixed pool of slots with UDP_SEGMENT (GSO). Everything is allocated at
 * open; the steady state allocates nothing. Offloads the kernel refuses are turned off at
 * run time, counted, and never lose a datagram.
 */
#ifndef CSTOQURING_H
#define CSTOQURING_H

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

/** The most UDP payload one IPv6 datagram carries (its payload length is 16 bits, less the
 *  8-byte UDP header), and so one GRO batch or one GSO send: a larger send fails EMSGSIZE.
 *  A transmit slot holds at most this much (stoq_uring_slot_size). STOQCore's
 *  `IPv6Address.largestUDPPayload` is the same number (a test checks they agree). */
#define STOQ_URING_UDP_PAYLOAD_MAX 65527u

/** The engine's feature bits (stoq_uring_features). STOQDatapathURing maps each to its
 *  DatapathFeatures member by name, so these values are this engine's alone. */
enum stoq_uring_feature {
  STOQ_URING_F_GSO = 1 << 0,
  STOQ_URING_F_GRO = 1 << 1,
  STOQ_URING_F_ECN = 1 << 2,
  STOQ_URING_F_MULTISHOT = 1 << 3,
};

typedef struct stoq_uring_config {
  struct sockaddr_in6 bind;
  unsigned worker_index;   /* this socket's place in the reuseport group */
  unsigned worker_count;   /* >1: SO_REUSEPORT + steering on the first CID byte */
  unsigned rx_buffers;     /* provided buffers (power of two) */
  unsigned rx_buffer_size; /* 0: stoq_uring_rx_buffer_size(); less than that is refused */
  unsigned tx_slots;
  unsigned tx_slot_size;
  int disable_gso, disable_gro;
} stoq_uring_config;

/** One received buffer (GRO: several datagrams of `segment_size`). Valid until stoq_uring_rx_done. */
typedef struct stoq_uring_rx {
  const uint8_t *data;
  uint32_t len;
  uint32_t segment_size;
  uint8_t ecn;
  struct sockaddr_in6 peer;
  /* The address the datagram was sent to (IPV6_PKTINFO; all zero if the kernel gave none),
   * and for a link-local one the interface it arrived on (0 otherwise). */
  struct in6_addr local;
  uint32_t local_scope_id;
} stoq_uring_rx;

typedef struct stoq_uring_counters {
  uint64_t rx_datagrams, rx_buffers, rx_bytes, tx_datagrams, tx_sends, tx_bytes, rx_dropped, tx_errors,
      offload_fallbacks;
} stoq_uring_counters;

typedef struct stoq_uring stoq_uring;

/** Opens the socket and ring. NULL with `err` ("call: reason") on failure. */
stoq_uring *stoq_uring_open(const stoq_uring_config *cfg, char *err, size_t errlen);
void stoq_uring_close(stoq_uring *u);
unsigned stoq_uring_features(const stoq_uring *u);
/** The receive buffer size that holds a full GRO batch beside the multishot header, the peer's
 *  address and the control data: the default, and the least stoq_uring_open accepts. */
size_t stoq_uring_rx_buffer_size(void);
/** The socket buffer size asked for and what the kernel granted for receive and send, in bytes.
 *  Without CAP_NET_ADMIN net.core.rmem_max and wmem_max cap the grant, without an error. */
void stoq_uring_socket_buffers(const stoq_uring *u, unsigned *requested, unsigned *receive, unsigned *send);
void stoq_uring_local(const stoq_uring *u, struct sockaddr_in6 *out);
const stoq_uring_counters *stoq_uring_get_counters(const stoq_uring *u);
unsigned stoq_uring_max_segments(const stoq_uring *u);
unsigned stoq_uring_slot_size(const stoq_uring *u);

/** Makes a waiting receive also return when `fd` (an eventfd; -1: none) becomes readable,
 *  and drains it. The ring does not own it. */
void stoq_uring_set_wake_fd(stoq_uring *u, int fd);
/** Under an Initial flood: sheds v1 Initials without a token in the kernel, before they are
 *  copied or queued, by the plan in bpf/stoq_kern_user.h ("Shedding an Initial flood"): `n`
 *  rules (at most STOQ_SHED_PREFIXES), `shift` for everyone else (shifts 0…32). Everything
 *  else passes. All shifts 0 detaches the filter. 0, or -1 with `err`. */
int stoq_uring_shed_initials(stoq_uring *u, const struct stoq_shed_rule *rules, unsigned n, unsigned shift, char *err,
                             size_t errlen);
/** Datagrams the kernel dropped for this socket: shed by that filter, or the receive buffer
 *  was full (SO_MEMINFO). A 32-bit count that wraps. */
uint64_t stoq_uring_socket_drops(const stoq_uring *u);
/** Waits up to `timeout_ns` (0: poll) and returns up to `max` received buffers, or -errno.
 *  The first call arms the receive: make it from the thread that owns the ring. */
int stoq_uring_receive(stoq_uring *u, uint64_t timeout_ns, stoq_uring_rx *out, int max);
/** Gives the buffers of the last receive back to the kernel. */
void stoq_uring_rx_done(stoq_uring *u);

/** A free transmit slot's buffer, or NULL when all are in flight. */
uint8_t *stoq_uring_tx_reserve(stoq_uring *u);
/** Queues the reserved slot: `len` bytes in datagrams of `segment_size`, leaving from `from`
 *  (NULL or unspecified: the kernel picks). A socket bound to a single address always sends
 *  from it; one bound to [::] attaches IPV6_PKTINFO so a host with several addresses answers
 *  from the one the peer wrote to. */
void stoq_uring_tx_commit(stoq_uring *u, size_t len, size_t segment_size, const struct sockaddr_in6 *to,
                          const struct sockaddr_in6 *from, uint8_t ecn);
/** Submits queued sends and reaps finished ones. Returns 0 or -errno. */
int stoq_uring_flush(stoq_uring *u);

/* The ancillary data of one send and one receive, exposed so tests can check the encoding
 * without a socket. The engine uses exactly these. */

/** Bytes a send's control buffer needs at most (UDP_SEGMENT + IPV6_TCLASS + IPV6_PKTINFO). */
size_t stoq_uring_tx_cmsg_space(void);
/** Writes a send's cmsgs into `control` (`cap` bytes, cmsghdr-aligned): UDP_SEGMENT when
 *  `segment_size` is nonzero, IPV6_TCLASS when `ecn` is, IPV6_PKTINFO with `source` and
 *  `ifindex` when `source` is non-NULL. Returns the control length (0: none), or 0 if `cap`
 *  is too small. */
size_t stoq_uring_encode_tx_cmsgs(void *control, size_t cap, uint16_t segment_size, uint8_t ecn,
                                  const struct in6_addr *source, uint32_t ifindex);
/** Reads a receive's cmsgs (UDP_GRO, IPV6_TCLASS, IPV6_PKTINFO) from `control` into the
 *  segment_size, ecn, local and local_scope_id of `rx`; leaves the rest of `rx` alone. */
void stoq_uring_decode_rx_cmsgs(const void *control, size_t len, stoq_uring_rx *rx);

#ifdef __cplusplus
}
#endif
#endif
