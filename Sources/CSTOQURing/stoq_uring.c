/* io_uring UDP engine; see include/CSTOQURing.h. */
#define _GNU_SOURCE
#include "CSTOQURing.h"
#include "stoq_kern_user.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <linux/filter.h>
#include <linux/sock_diag.h>
#include <liburing.h>
#include <netinet/udp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

#define BGID 7
#define TAG_RX (1ull << 63)
#define CMSG_SPACE_RX (CMSG_SPACE(sizeof(int)) * 2 + CMSG_SPACE(sizeof(struct in6_pktinfo)))
#define CMSG_SPACE_TX (CMSG_SPACE(sizeof(uint16_t)) + CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(struct in6_pktinfo)))
#define RX_NAME_LEN sizeof(struct sockaddr_in6)
/* The most UDP payload one receive carries: GRO stops merging before the IPv6 payload length
 * would pass 65535 (skb_gro_receive), as for a single datagram; a full GRO batch of 1452-byte
 * datagrams is 65,388 bytes. */
#define RX_PAYLOAD_MAX STOQ_URING_UDP_PAYLOAD_MAX
/* A multishot recvmsg puts io_uring_recvmsg_out, then rx_msg's name and control areas, then
 * the payload in one buffer: 64 KiB left less than a full GRO batch, and such a batch came
 * back MSG_TRUNC and was dropped whole. Rounded to a cache line. */
#define RX_BUFFER_SIZE                                                                                                 \
  ((sizeof(struct io_uring_recvmsg_out) + RX_NAME_LEN + CMSG_SPACE_RX + RX_PAYLOAD_MAX + 63) & ~(size_t)63)
/* The socket buffers asked for: a GRO burst from a fast sender must not overflow while the
 * worker is busy. */
#define SOCKET_BUFFER_BYTES (32 << 20)

struct tx_slot {
  uint8_t *buf;
  struct msghdr msg;
  struct iovec iov;
  struct sockaddr_in6 to;
  struct in6_addr src; /* IPV6_PKTINFO source when has_src */
  uint32_t src_ifindex;
  int has_src;
  size_t len, segsize;
  uint8_t ecn;
  int in_flight;
  union {
    char buf[CMSG_SPACE_TX];
    struct cmsghdr align;
  } cmsg;
};

struct stoq_uring {
  int fd;
  struct io_uring ring;
  unsigned features;
  unsigned rcvbuf, sndbuf; /* what the kernel granted of SOCKET_BUFFER_BYTES */
  struct sockaddr_in6 local;
  int bound_any; /* bound to [::]: every send names its source (IPV6_PKTINFO) */
  int shedding;  /* stoq_uring_shed_initials attached its filter */
  stoq_uring_counters counters;
  /* receive */
  struct io_uring_buf_ring *br;
  uint8_t *rx_mem;
  unsigned rx_count, rx_size;
  struct msghdr rx_msg; /* template for multishot: name + control lengths */
  int rx_armed;
  uint16_t *done_bids;
  unsigned ndone;
  /* fallback receive (no multishot) */
  int plain_rx;
  /* another worker's nudge (eventfd, -1: none), watched by a multishot poll */
  int wake_fd, wake_armed;
  /* transmit */
  struct tx_slot *slots;
  unsigned nslots, slot_size;
  unsigned *free_list;
  unsigned nfree;
  int reserved; /* slot index reserved, -1 if none */
  unsigned queued;
};

static void set_err(char *err, size_t n, const char *fmt, ...) {
  if (!err || !n) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
}

/* Classic BPF for SO_ATTACH_REUSEPORT_CBPF: pick the socket from the worker byte of the
 * QUIC destination connection ID (bpf/stoq_kern_user.h). The program sees the UDP
 * payload at offset 0. Out-of-range results make the kernel hash. */
static int attach_steering(int fd, unsigned nworkers) {
  struct sock_filter code[] = {
      /* A = payload[0] */
      BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 0),
      /* long header? */
      BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, STOQ_QUIC_LONG_HEADER_BIT, 0, 2),
      /* long: A = the worker byte of the DCID */
      BPF_STMT(BPF_LD | BPF_B | BPF_ABS, STOQ_QUIC_LONG_WORKER_OFFSET),
      BPF_JUMP(BPF_JMP | BPF_JA, 1, 0, 0),
      /* short: A = the worker byte of the DCID */
      BPF_STMT(BPF_LD | BPF_B | BPF_ABS, STOQ_QUIC_SHORT_WORKER_OFFSET),
      BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, nworkers),
      BPF_STMT(BPF_RET | BPF_A, 0),
  };
  struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};
  return setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog));
}

/* Classic BPF for SO_ATTACH_FILTER: sheds v1 Initials without a token, keeping one in
 * 2^shift of them at random, and passes everything else. The rule and its offsets are
 * stoq_quic_sheddable_initial's (bpf/stoq_kern_user.h); on a UDP socket the program sees the
 * UDP header first (the payload starts at offset 8), and the IPv6 header at SKF_NET_OFF. A load
 * past the datagram's end drops it, as stoq_quic_sheddable_initial's "too short" says.
 *
 *   is it a sheddable Initial?          no: KEEP
 *   source in rule i's /64?             keep one in 2^shift_i (first match)
 *   otherwise                           keep one in 2^shift
 */
#define SHED_PAYLOAD 8
#define SHED_SRC (SKF_NET_OFF + 8) /* struct ipv6hdr's saddr */
#define SHED_RULE_LEN 7
#define SHED_LEN (12 + SHED_RULE_LEN * STOQ_SHED_PREFIXES + 3 + 2)

static int attach_shedding(int fd, const struct stoq_shed_rule *rules, unsigned n, unsigned shift) {
  struct sock_filter code[SHED_LEN];
  unsigned len = 0;
  const unsigned keep = 12 + SHED_RULE_LEN * n + 3, drop = keep + 1;
#define EMIT(ins) (code[len] = (struct sock_filter)ins, len++)
#define TO(label) ((uint8_t)((label)-len - 1)) /* a jump offset from the instruction being emitted */
  /* 0: a v1 Initial? */
  EMIT(BPF_STMT(BPF_LD | BPF_B | BPF_ABS, SHED_PAYLOAD));
  EMIT(BPF_STMT(BPF_ALU | BPF_AND | BPF_K, STOQ_QUIC_INITIAL_MASK));
  EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, STOQ_QUIC_INITIAL_V1, 0, TO(keep)));
  EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SHED_PAYLOAD + STOQ_QUIC_VERSION_OFFSET));
  EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, STOQ_QUIC_VERSION_1, 0, TO(keep)));
  /* 5: X = DCID length + SCID length; A = the token length's first byte; 0 = none */
  EMIT(BPF_STMT(BPF_LD | BPF_B | BPF_ABS, SHED_PAYLOAD + STOQ_QUIC_LONG_DCID_LEN_OFFSET));
  EMIT(BPF_STMT(BPF_MISC | BPF_TAX, 0));
  EMIT(BPF_STMT(BPF_LD | BPF_B | BPF_IND, SHED_PAYLOAD + STOQ_QUIC_LONG_SCID_LEN_OFFSET));
  EMIT(BPF_STMT(BPF_ALU | BPF_ADD | BPF_X, 0));
  EMIT(BPF_STMT(BPF_MISC | BPF_TAX, 0));
  EMIT(BPF_STMT(BPF_LD | BPF_B | BPF_IND, SHED_PAYLOAD + STOQ_QUIC_INITIAL_TOKEN_LEN_OFFSET));
  EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, TO(keep)));
  /* 12: the rules, SHED_RULE_LEN instructions each */
  for (unsigned i = 0; i < n; i++) {
    unsigned next = len + SHED_RULE_LEN;
    EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SHED_SRC));
    EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)(rules[i].prefix >> 32), 0, TO(next)));
    EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SHED_SRC + 4));
    EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)rules[i].prefix, 0, TO(next)));
    EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_RANDOM));
    EMIT(BPF_STMT(BPF_ALU | BPF_AND | BPF_K, stoq_shed_keep_mask(rules[i].shift)));
    EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, TO(keep), TO(drop)));
  }
  /* everyone else */
  EMIT(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_RANDOM));
  EMIT(BPF_STMT(BPF_ALU | BPF_AND | BPF_K, stoq_shed_keep_mask(shift)));
  EMIT(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, TO(keep), TO(drop)));
  EMIT(BPF_STMT(BPF_RET | BPF_K, 0xffffffffu)); /* keep */
  EMIT(BPF_STMT(BPF_RET | BPF_K, 0));           /* drop */
#undef TO
#undef EMIT
  struct sock_fprog prog = {.len = (unsigned short)len, .filter = code};
  return setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog));
}

int stoq_uring_shed_initials(stoq_uring *u, const struct stoq_shed_rule *rules, unsigned n, unsigned shift, char *err,
                             size_t errlen) {
  if (n > STOQ_SHED_PREFIXES) n = STOQ_SHED_PREFIXES;
  int any = shift > 0;
  for (unsigned i = 0; i < n; i++) any |= rules[i].shift > 0;
  if (!any) {
    int none = 0; /* the kernel wants an int's length even here */
    if (u->shedding && setsockopt(u->fd, SOL_SOCKET, SO_DETACH_FILTER, &none, sizeof(none)) != 0 && errno != ENOENT) {
      set_err(err, errlen, "setsockopt(SO_DETACH_FILTER): %s", strerror(errno));
      return -1;
    }
    u->shedding = 0;
    return 0;
  }
  if (attach_shedding(u->fd, rules, n, shift) != 0) {
    set_err(err, errlen, "setsockopt(SO_ATTACH_FILTER): %s", strerror(errno));
    return -1;
  }
  u->shedding = 1;
  return 0;
}

uint64_t stoq_uring_socket_drops(const stoq_uring *u) {
  uint32_t mem[SK_MEMINFO_VARS];
  socklen_t len = sizeof(mem);
  if (getsockopt(u->fd, SOL_SOCKET, SO_MEMINFO, mem, &len) != 0 || len <= SK_MEMINFO_DROPS * sizeof(uint32_t)) return 0;
  return mem[SK_MEMINFO_DROPS];
}

/* Asks for `want` bytes of socket buffer, forced past net.core.rmem_max / wmem_max where the
 * process has CAP_NET_ADMIN, and returns what the kernel granted: without the capability the
 * sysctl caps the request and setsockopt still succeeds. */
static unsigned set_socket_buffer(int fd, int force, int plain, int want) {
  if (setsockopt(fd, SOL_SOCKET, force, &want, sizeof(want)) != 0)
    setsockopt(fd, SOL_SOCKET, plain, &want, sizeof(want));
  int got = 0;
  socklen_t len = sizeof(got);
  if (getsockopt(fd, SOL_SOCKET, plain, &got, &len) != 0) return (unsigned)want;
  return (unsigned)got / 2; /* the kernel doubles what it grants (bookkeeping overhead) */
}

static void arm_rx(stoq_uring *u) {
  struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
  if (!sqe) {
    io_uring_submit(&u->ring);
    sqe = io_uring_get_sqe(&u->ring);
    if (!sqe) return;
  }
  io_uring_prep_recvmsg_multishot(sqe, u->fd, &u->rx_msg, 0);
  sqe->flags |= IOSQE_BUFFER_SELECT;
  sqe->buf_group = BGID;
  io_uring_sqe_set_data64(sqe, TAG_RX);
  u->rx_armed = 1;
}

stoq_uring *stoq_uring_open(const stoq_uring_config *cfg, char *err, size_t errlen) {
  stoq_uring *u = calloc(1, sizeof(*u));
  if (!u) return NULL;
  u->fd = -1;
  u->reserved = -1;
  u->wake_fd = -1;
  u->rx_count = cfg->rx_buffers ? cfg->rx_buffers : 256;
  u->rx_size = cfg->rx_buffer_size ? cfg->rx_buffer_size : (unsigned)RX_BUFFER_SIZE;
  u->nslots = cfg->tx_slots ? cfg->tx_slots : 64;
  u->slot_size = cfg->tx_slot_size ? cfg->tx_slot_size : 65536;
  int one = 1;
  /* Until the ring exists a failure closes the socket only: the ring is all zeros, and
   * io_uring_queue_exit on it would close fd 0. */
  if (u->rx_size < RX_BUFFER_SIZE) {
    set_err(err, errlen, "rx_buffer_size: %u is below %zu, the room a full GRO batch takes", u->rx_size,
            (size_t)RX_BUFFER_SIZE);
    goto fail_noring;
  }

  u->fd = socket(AF_INET6, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (u->fd < 0) {
    set_err(err, errlen, "socket: %s", strerror(errno));
    goto fail_noring;
  }
  /* IPv6 only: an IPv4 datagram must never reach QUIC. */
  if (setsockopt(u->fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0) {
    set_err(err, errlen, "setsockopt(IPV6_V6ONLY): %s", strerror(errno));
    goto fail_noring;
  }
  u->rcvbuf = set_socket_buffer(u->fd, SO_RCVBUFFORCE, SO_RCVBUF, SOCKET_BUFFER_BYTES);
  u->sndbuf = set_socket_buffer(u->fd, SO_SNDBUFFORCE, SO_SNDBUF, SOCKET_BUFFER_BYTES);
  setsockopt(u->fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof(one));
  if (setsockopt(u->fd, IPPROTO_IPV6, IPV6_RECVTCLASS, &one, sizeof(one)) == 0) u->features |= STOQ_URING_F_ECN;
  if (!cfg->disable_gro && setsockopt(u->fd, SOL_UDP, UDP_GRO, &one, sizeof(one)) == 0) u->features |= STOQ_URING_F_GRO;
  if (!cfg->disable_gso) {
    int seg = 0;
    socklen_t sl = sizeof(seg);
    if (getsockopt(u->fd, SOL_UDP, UDP_SEGMENT, &seg, &sl) == 0) u->features |= STOQ_URING_F_GSO;
  }
  if (cfg->worker_count > 1) {
    if (setsockopt(u->fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) {
      set_err(err, errlen, "setsockopt(SO_REUSEPORT): %s", strerror(errno));
      goto fail_noring;
    }
  }
  if (bind(u->fd, (const struct sockaddr *)&cfg->bind, sizeof(cfg->bind)) != 0) {
    char a[INET6_ADDRSTRLEN];
    inet_ntop(AF_INET6, &cfg->bind.sin6_addr, a, sizeof(a));
    set_err(err, errlen, "bind([%s]:%u): %s", a, ntohs(cfg->bind.sin6_port), strerror(errno));
    goto fail_noring;
  }
  if (cfg->worker_count > 1 && cfg->worker_index == 0 && attach_steering(u->fd, cfg->worker_count) != 0) {
    set_err(err, errlen, "setsockopt(SO_ATTACH_REUSEPORT_CBPF): %s", strerror(errno));
    goto fail_noring;
  }
  socklen_t ll = sizeof(u->local);
  getsockname(u->fd, (struct sockaddr *)&u->local, &ll);
  u->bound_any = IN6_IS_ADDR_UNSPECIFIED(&u->local.sin6_addr);

  struct io_uring_params p = {0};
  /* No SINGLE_ISSUER: the node opens queues on the main thread and hands them to workers. */
  p.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN;
  int rv = io_uring_queue_init_params(1024, &u->ring, &p);
  if (rv < 0) {
    memset(&p, 0, sizeof(p));
    rv = io_uring_queue_init_params(1024, &u->ring, &p);
  }
  if (rv < 0) {
    set_err(err, errlen, "io_uring_queue_init: %s", strerror(-rv));
    goto fail_noring;
  }

  /* Receive buffers: one region, handed to the kernel as a provided-buffer ring. */
  u->rx_mem = aligned_alloc(4096, (size_t)u->rx_count * u->rx_size);
  u->done_bids = calloc(u->rx_count, sizeof(uint16_t));
  if (!u->rx_mem || !u->done_bids) {
    set_err(err, errlen, "allocating receive buffers: out of memory");
    goto fail;
  }
  size_t ring_bytes = u->rx_count * sizeof(struct io_uring_buf);
  u->br = aligned_alloc(4096, (ring_bytes + 4095) & ~(size_t)4095);
  if (u->br) {
    io_uring_buf_ring_init(u->br);
    struct io_uring_buf_reg reg = {.ring_addr = (unsigned long)u->br, .ring_entries = u->rx_count, .bgid = BGID};
    if (io_uring_register_buf_ring(&u->ring, &reg, 0) == 0) {
      int mask = io_uring_buf_ring_mask(u->rx_count);
      for (unsigned i = 0; i < u->rx_count; i++)
        io_uring_buf_ring_add(u->br, u->rx_mem + (size_t)i * u->rx_size, u->rx_size, (unsigned short)i, mask, (int)i);
      io_uring_buf_ring_advance(u->br, (int)u->rx_count);
      u->features |= STOQ_URING_F_MULTISHOT;
    } else {
      free(u->br);
      u->br = NULL;
    }
  }
  if (!(u->features & STOQ_URING_F_MULTISHOT)) u->plain_rx = 1;
  u->rx_msg.msg_namelen = RX_NAME_LEN;
  u->rx_msg.msg_controllen = CMSG_SPACE_RX;

  /* Transmit slots. */
  u->slots = calloc(u->nslots, sizeof(*u->slots));
  u->free_list = calloc(u->nslots, sizeof(unsigned));
  uint8_t *txmem = aligned_alloc(4096, (size_t)u->nslots * u->slot_size);
  if (!u->slots || !u->free_list || !txmem) {
    set_err(err, errlen, "allocating transmit slots: out of memory");
    free(txmem);
    goto fail;
  }
  for (unsigned i = 0; i < u->nslots; i++) {
    u->slots[i].buf = txmem + (size_t)i * u->slot_size;
    u->free_list[u->nfree++] = u->nslots - 1 - i;
  }
  /* The multishot receive is armed by the first stoq_uring_receive, on the owning worker's
   * thread, not here: io_uring completes a receive through task work on the thread that
   * submitted it, and the node opens queues on another thread. Armed here, an idle Dispatch
   * thread woke for every batch of datagrams to post it and then woke the worker. */
  return u;

fail:
  io_uring_queue_exit(&u->ring);
fail_noring:
  if (u->fd >= 0) close(u->fd);
  free(u->rx_mem);
  free(u->done_bids);
  free(u->br);
  free(u->slots);
  free(u->free_list);
  free(u);
  return NULL;
}

void stoq_uring_close(stoq_uring *u) {
  if (!u) return;
  /* io_uring_queue_exit tears the ring down in a kernel worker, after it returns: requests
     still pending there (the multishot receive, the wakeup read) keep the socket open and
     its port bound for a while after close. Cancel them all synchronously first (kernel
     6.0+; older kernels refuse and keep the old behaviour). */
  struct io_uring_sync_cancel_reg cancel = {
      .fd = -1, .flags = IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY, .timeout = {.tv_sec = 1, .tv_nsec = 0}};
  (void)io_uring_register_sync_cancel(&u->ring, &cancel);
  io_uring_queue_exit(&u->ring);
  close(u->fd);
  if (u->slots) free(u->slots[0].buf);
  free(u->slots);
  free(u->free_list);
  free(u->rx_mem);
  free(u->done_bids);
  free(u->br);
  free(u);
}

unsigned stoq_uring_features(const stoq_uring *u) { return u->features; }
size_t stoq_uring_rx_buffer_size(void) { return RX_BUFFER_SIZE; }
void stoq_uring_socket_buffers(const stoq_uring *u, unsigned *requested, unsigned *receive, unsigned *send) {
  *requested = SOCKET_BUFFER_BYTES;
  *receive = u->rcvbuf;
  *send = u->sndbuf;
}
void stoq_uring_local(const stoq_uring *u, struct sockaddr_in6 *out) { *out = u->local; }
const stoq_uring_counters *stoq_uring_get_counters(const stoq_uring *u) { return &u->counters; }
/* A GSO send is one UDP datagram to the kernel until it is cut: past STOQ_URING_UDP_PAYLOAD_MAX
 * it fails EMSGSIZE, whatever the slot holds (32 datagrams of 2048 bytes fill 65,536). */
unsigned stoq_uring_slot_size(const stoq_uring *u) {
  return u->slot_size < STOQ_URING_UDP_PAYLOAD_MAX ? u->slot_size : STOQ_URING_UDP_PAYLOAD_MAX;
}
unsigned stoq_uring_max_segments(const stoq_uring *u) { return (u->features & STOQ_URING_F_GSO) ? 64 : 1; }

static void parse_cmsg(struct cmsghdr *c, stoq_uring_rx *rx) {
  {
    if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
      int seg;
      memcpy(&seg, CMSG_DATA(c), sizeof(seg));
      rx->segment_size = (uint32_t)seg;
    } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_TCLASS) {
      int tc;
      memcpy(&tc, CMSG_DATA(c), sizeof(tc));
      rx->ecn = (uint8_t)(tc & 3);
    } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
      struct in6_pktinfo pi;
      memcpy(&pi, CMSG_DATA(c), sizeof(pi));
      rx->local = pi.ipi6_addr;
      /* A link-local address means nothing without its interface; a global one needs none,
       * and a scope on it would make the same path look different. */
      rx->local_scope_id = IN6_IS_ADDR_LINKLOCAL(&pi.ipi6_addr) ? (uint32_t)pi.ipi6_ifindex : 0;
    }
  }
}

static void parse_cmsgs(struct msghdr *m, stoq_uring_rx *rx) {
  for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) parse_cmsg(c, rx);
}

/* The multishot layout keeps control data inside the buffer: walk it with liburing's helpers. */
static void parse_multishot_cmsgs(struct io_uring_recvmsg_out *o, struct msghdr *m, stoq_uring_rx *rx) {
  for (struct cmsghdr *c = io_uring_recvmsg_cmsg_firsthdr(o, m); c; c = io_uring_recvmsg_cmsg_nexthdr(o, m, c))
    parse_cmsg(c, rx);
}

void stoq_uring_decode_rx_cmsgs(const void *control, size_t len, stoq_uring_rx *rx) {
  struct msghdr m = {.msg_control = (void *)control, .msg_controllen = len};
  parse_cmsgs(&m, rx);
}

size_t stoq_uring_tx_cmsg_space(void) { return CMSG_SPACE_TX; }

size_t stoq_uring_encode_tx_cmsgs(void *control, size_t cap, uint16_t segment_size, uint8_t ecn,
                                  const struct in6_addr *source, uint32_t ifindex) {
  size_t clen = 0;
  if (segment_size) clen += CMSG_SPACE(sizeof(uint16_t));
  if (ecn) clen += CMSG_SPACE(sizeof(int));
  if (source) clen += CMSG_SPACE(sizeof(struct in6_pktinfo));
  if (!clen || clen > cap) return 0;
  memset(control, 0, clen);
  struct msghdr m = {.msg_control = control, .msg_controllen = clen};
  struct cmsghdr *c = CMSG_FIRSTHDR(&m);
  if (segment_size) {
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(c), &segment_size, sizeof(segment_size));
    c = CMSG_NXTHDR(&m, c);
  }
  if (ecn) {
    c->cmsg_level = IPPROTO_IPV6;
    c->cmsg_type = IPV6_TCLASS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    int tc = ecn & 3;
    memcpy(CMSG_DATA(c), &tc, sizeof(tc));
    c = CMSG_NXTHDR(&m, c);
  }
  if (source) {
    c->cmsg_level = IPPROTO_IPV6;
    c->cmsg_type = IPV6_PKTINFO;
    c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
    struct in6_pktinfo pi = {.ipi6_addr = *source, .ipi6_ifindex = ifindex};
    memcpy(CMSG_DATA(c), &pi, sizeof(pi));
  }
  return clen;
}

static int is_v4_mapped(const struct in6_addr *a) { return IN6_IS_ADDR_V4MAPPED(a); }

/* Resends a slot one datagram at a time after the kernel refused GSO: same destination,
 * ECN and source as the slot, no UDP_SEGMENT. Returns how many datagrams the kernel took. */
static size_t resend_unsegmented(stoq_uring *u, struct tx_slot *s) {
  size_t off = 0, sent = 0;
  union {
    char buf[CMSG_SPACE_TX];
    struct cmsghdr align;
  } cmsg;
  size_t clen =
      stoq_uring_encode_tx_cmsgs(cmsg.buf, sizeof(cmsg.buf), 0, s->ecn, s->has_src ? &s->src : NULL, s->src_ifindex);
  while (off < s->len) {
    size_t n = s->len - off < s->segsize ? s->len - off : s->segsize;
    struct iovec iov = {s->buf + off, n};
    struct msghdr m = {.msg_name = &s->to,
                       .msg_namelen = sizeof(s->to),
                       .msg_iov = &iov,
                       .msg_iovlen = 1,
                       .msg_control = clen ? cmsg.buf : NULL,
                       .msg_controllen = clen};
    ssize_t r = sendmsg(u->fd, &m, 0);
    if (r < 0) u->counters.tx_errors++;
    else {
      u->counters.tx_datagrams++;
      u->counters.tx_bytes += n;
      sent++;
    }
    off += n;
  }
  return sent;
}

static void complete_tx(stoq_uring *u, unsigned idx, int res) {
  struct tx_slot *s = &u->slots[idx];
  if (res < 0) {
    if ((res == -EIO || res == -EINVAL || res == -EMSGSIZE) && s->segsize < s->len &&
        (u->features & STOQ_URING_F_GSO)) {
      /* EINVAL also means a source address the host no longer has (IPV6_PKTINFO): then the
       * single datagrams fail too, and GSO was not to blame. EMSGSIZE: a run the kernel would
       * not take whole (a device's GSO limit below the slot's); its datagrams alone it takes. */
      if (resend_unsegmented(u, s) > 0 || !s->has_src) {
        u->features &= ~STOQ_URING_F_GSO;
        u->counters.offload_fallbacks++;
      }
    } else {
      u->counters.tx_errors++;
    }
  } else {
    size_t segs = s->segsize ? (s->len + s->segsize - 1) / s->segsize : 1;
    u->counters.tx_datagrams += segs;
    u->counters.tx_sends++;
    u->counters.tx_bytes += s->len;
  }
  s->in_flight = 0;
  u->free_list[u->nfree++] = idx;
}

static int plain_receive(stoq_uring *u, stoq_uring_rx *out, int max) {
  /* Fallback when the kernel has no buffer rings: plain recvmsg into our buffers. */
  int n = 0;
  while (n < max && (unsigned)n < u->rx_count) {
    uint8_t *buf = u->rx_mem + (size_t)n * u->rx_size;
    struct iovec iov = {buf, u->rx_size};
    char cbuf[CMSG_SPACE_RX];
    struct msghdr m = {.msg_name = &out[n].peer,
                       .msg_namelen = sizeof(out[n].peer),
                       .msg_iov = &iov,
                       .msg_iovlen = 1,
                       .msg_control = cbuf,
                       .msg_controllen = sizeof(cbuf)};
    ssize_t r = recvmsg(u->fd, &m, MSG_DONTWAIT);
    if (r < 0) break;
    memset(&out[n].local, 0, sizeof(out[n].local));
    out[n].local_scope_id = 0;
    out[n].segment_size = 0;
    out[n].ecn = 0;
    parse_cmsgs(&m, &out[n]);
    if (r == 0 || (m.msg_flags & MSG_TRUNC) || is_v4_mapped(&out[n].peer.sin6_addr)) {
      u->counters.rx_dropped++;
      continue;
    }
    out[n].data = buf;
    out[n].len = (uint32_t)r;
    if (!out[n].segment_size) out[n].segment_size = (uint32_t)r;
    u->counters.rx_datagrams += (r + out[n].segment_size - 1) / out[n].segment_size;
    u->counters.rx_bytes += (uint64_t)r;
    n++;
  }
  return n;
}

void stoq_uring_set_wake_fd(stoq_uring *u, int fd) {
  u->wake_fd = fd;
  u->wake_armed = 0;
}

#define TAG_WAKE (TAG_RX | 2)

int stoq_uring_receive(stoq_uring *u, uint64_t timeout_ns, stoq_uring_rx *out, int max) {
  if (!u->plain_rx && !u->rx_armed) arm_rx(u);
  if (u->wake_fd >= 0 && !u->wake_armed) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
    if (sqe) {
      io_uring_prep_poll_multishot(sqe, u->wake_fd, POLLIN);
      io_uring_sqe_set_data64(sqe, TAG_WAKE);
      u->wake_armed = 1;
    }
  }
  struct io_uring_cqe *cqe;
  int rv;
  if (timeout_ns == 0) {
    rv = io_uring_submit(&u->ring);
  } else {
    struct __kernel_timespec ts = {.tv_sec = (long long)(timeout_ns / 1000000000ull),
                                   .tv_nsec = (long long)(timeout_ns % 1000000000ull)};
    if (u->plain_rx) {
      /* Poll the socket through the ring so timeouts still work. */
      struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
      if (sqe) {
        io_uring_prep_poll_add(sqe, u->fd, POLLIN);
        io_uring_sqe_set_data64(sqe, TAG_RX | 1);
      }
    }
    rv = io_uring_submit_and_wait_timeout(&u->ring, &cqe, 1, &ts, NULL);
  }
  if (rv < 0 && rv != -ETIME && rv != -EINTR && rv != -EAGAIN && rv != -EBUSY) return rv;

  int n = 0;
  unsigned head, seen = 0;
  io_uring_for_each_cqe(&u->ring, head, cqe) {
    uint64_t tag = io_uring_cqe_get_data64(cqe);
    /* A full batch leaves the next datagrams in the ring for the next call (taking them
     * here would drop them: a loaded worker lost datagrams that way). */
    if (tag == TAG_RX && n >= max) break;
    seen++;
    if (!(tag & TAG_RX)) {
      complete_tx(u, (unsigned)tag, cqe->res);
      continue;
    }
    if (tag == (TAG_RX | 1)) continue; /* poll wakeup (fallback mode) */
    if (tag == TAG_WAKE) {
      uint64_t v;
      if (read(u->wake_fd, &v, sizeof(v)) < 0) { /* already drained */
      }
      if (!(cqe->flags & IORING_CQE_F_MORE)) u->wake_armed = 0;
      continue;
    }
    if (!(cqe->flags & IORING_CQE_F_MORE)) u->rx_armed = 0;
    if (cqe->res < 0) {
      if (cqe->res != -ENOBUFS) u->counters.rx_dropped++;
      continue;
    }
    if (!(cqe->flags & IORING_CQE_F_BUFFER)) continue;
    uint16_t bid = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
    u->done_bids[u->ndone++] = bid;
    uint8_t *buf = u->rx_mem + (size_t)bid * u->rx_size;
    struct io_uring_recvmsg_out *o = io_uring_recvmsg_validate(buf, cqe->res, &u->rx_msg);
    if (!o || (o->flags & MSG_TRUNC) || o->namelen < sizeof(struct sockaddr_in6)) {
      u->counters.rx_dropped++;
      continue;
    }
    stoq_uring_rx *rx = &out[n];
    memcpy(&rx->peer, io_uring_recvmsg_name(o), sizeof(rx->peer));
    if (is_v4_mapped(&rx->peer.sin6_addr)) {
      u->counters.rx_dropped++;
      continue;
    }
    memset(&rx->local, 0, sizeof(rx->local));
    rx->local_scope_id = 0;
    rx->segment_size = 0;
    rx->ecn = 0;
    parse_multishot_cmsgs(o, &u->rx_msg, rx);
    rx->data = io_uring_recvmsg_payload(o, &u->rx_msg);
    rx->len = io_uring_recvmsg_payload_length(o, cqe->res, &u->rx_msg);
    if (rx->len == 0) { /* an empty datagram carries no packet: count it, hand nothing over */
      u->counters.rx_dropped++;
      continue;
    }
    if (!rx->segment_size) rx->segment_size = rx->len ? rx->len : 1;
    u->counters.rx_datagrams += (rx->len + rx->segment_size - 1) / rx->segment_size;
    u->counters.rx_bytes += rx->len;
    u->counters.rx_buffers++;
    n++;
  }
  io_uring_cq_advance(&u->ring, seen);
  if (u->plain_rx) n += plain_receive(u, out + n, max - n);
  return n;
}

void stoq_uring_rx_done(stoq_uring *u) {
  if (!u->ndone || !u->br) {
    u->ndone = 0;
    return;
  }
  int mask = io_uring_buf_ring_mask(u->rx_count);
  for (unsigned i = 0; i < u->ndone; i++)
    io_uring_buf_ring_add(u->br, u->rx_mem + (size_t)u->done_bids[i] * u->rx_size, u->rx_size, u->done_bids[i], mask,
                          (int)i);
  io_uring_buf_ring_advance(u->br, (int)u->ndone);
  u->ndone = 0;
}

uint8_t *stoq_uring_tx_reserve(stoq_uring *u) {
  if (u->reserved >= 0) return u->slots[u->reserved].buf;
  if (u->nfree == 0) {
    /* Reap what finished before saying no. */
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&u->ring, head, cqe) {
      uint64_t tag = io_uring_cqe_get_data64(cqe);
      if (tag & TAG_RX) break; /* leave receive completions for receive */
      complete_tx(u, (unsigned)tag, cqe->res);
      seen++;
    }
    io_uring_cq_advance(&u->ring, seen);
    if (u->nfree == 0) return NULL;
  }
  u->reserved = (int)u->free_list[--u->nfree];
  return u->slots[u->reserved].buf;
}

void stoq_uring_tx_commit(stoq_uring *u, size_t len, size_t segsize, const struct sockaddr_in6 *to,
                          const struct sockaddr_in6 *from, uint8_t ecn) {
  if (u->reserved < 0) return;
  unsigned idx = (unsigned)u->reserved;
  u->reserved = -1;
  struct tx_slot *s = &u->slots[idx];
  s->len = len;
  s->segsize = segsize ? segsize : len;
  s->to = *to;
  s->ecn = ecn;
  /* Bound to one address, the kernel already sends from it; bound to [::] it would pick by
   * route, which on a host with several addresses is often not the one the peer wrote to. */
  s->has_src = u->bound_any && from && !IN6_IS_ADDR_UNSPECIFIED(&from->sin6_addr);
  if (s->has_src) {
    s->src = from->sin6_addr;
    s->src_ifindex =
        IN6_IS_ADDR_LINKLOCAL(&from->sin6_addr) ? (from->sin6_scope_id ? from->sin6_scope_id : to->sin6_scope_id) : 0;
  }
  s->iov.iov_base = s->buf;
  s->iov.iov_len = len;
  memset(&s->msg, 0, sizeof(s->msg));
  s->msg.msg_name = &s->to;
  s->msg.msg_namelen = sizeof(s->to);
  s->msg.msg_iov = &s->iov;
  s->msg.msg_iovlen = 1;
  uint16_t gso = (s->segsize < len && (u->features & STOQ_URING_F_GSO)) ? (uint16_t)s->segsize : 0;
  size_t clen = stoq_uring_encode_tx_cmsgs(s->cmsg.buf, sizeof(s->cmsg.buf), gso, ecn, s->has_src ? &s->src : NULL,
                                           s->src_ifindex);
  if (clen) {
    s->msg.msg_control = s->cmsg.buf;
    s->msg.msg_controllen = clen;
  }
  if (s->segsize < len && !(u->features & STOQ_URING_F_GSO)) {
    /* No GSO: send the run one datagram at a time, right now. */
    resend_unsegmented(u, s);
    u->free_list[u->nfree++] = idx;
    return;
  }
  struct io_uring_sqe *sqe = io_uring_get_sqe(&u->ring);
  if (!sqe) {
    io_uring_submit(&u->ring);
    sqe = io_uring_get_sqe(&u->ring);
  }
  if (!sqe) {
    u->counters.tx_errors++;
    u->free_list[u->nfree++] = idx;
    return;
  }
  io_uring_prep_sendmsg(sqe, u->fd, &s->msg, 0);
  io_uring_sqe_set_data64(sqe, idx);
  s->in_flight = 1;
  u->queued++;
}

int stoq_uring_flush(stoq_uring *u) {
  if (u->queued) {
    u->queued = 0;
    int rv = io_uring_submit(&u->ring);
    if (rv < 0 && rv != -EBUSY && rv != -EAGAIN) return rv;
  }
  return 0;
}
