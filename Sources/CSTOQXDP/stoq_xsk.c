/* AF_XDP engine; see include/CSTOQXDP.h. */
#define _GNU_SOURCE
#include "CSTOQXDP.h"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <ifaddrs.h>
#include <linux/if_link.h>
#include <linux/if_xdp.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
#include <xdp/xsk.h>

#include "stoq_kern_user.h"

#ifndef SO_PREFER_BUSY_POLL
#define SO_PREFER_BUSY_POLL 69
#endif
#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif

#define ETH_HLEN_ 14
#define IP6_HLEN 40
#define UDP_HLEN 8
#define NEIGH_SLOTS 1024 /* power of two */
#define NEIGH_PROBE 8
#define NEIGH_REFRESH_NS 200000000ull
#define NL_BUF 32768
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
  /* Transmit frames start tx_off bytes into their UMEM frame (room for TX metadata when
   * the UMEM reserved it); tx_csum_offload: the kernel or NIC sums the UDP checksum. */
  uint32_t tx_off;
  int tx_csum_offload;

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
  uint64_t last_refresh;
  uint8_t *nl_buf;
  int solicit_fd;
  int wake_fd; /* another worker's nudge (eventfd), or -1 */
  stoq_xsk *learner; /* whose neighbour table received frames teach (itself, or its group's transmitter) */
};

static void set_err(char *err, size_t n, const char *fmt, ...) {
  if (!err || !n) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int is_any(const struct in6_addr *a) {
  static const struct in6_addr any = IN6ADDR_ANY_INIT;
  return memcmp(a, &any, sizeof(any)) == 0;
}

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

static inline uint32_t neigh_hash(const struct in6_addr *a) {
  uint64_t lo, hi;
  memcpy(&lo, a, 8);
  memcpy(&hi, (const uint8_t *)a + 8, 8);
  uint64_t h = (lo ^ (hi * 0x9E3779B97F4A7C15ull)) * 0xff51afd7ed558ccdull;
  return (uint32_t)(h >> 40);
}

static struct neigh *neigh_find(stoq_xsk *x, const struct in6_addr *peer) {
  uint32_t h = neigh_hash(peer);
  for (int i = 0; i < NEIGH_PROBE; i++) {
    struct neigh *n = &x->neigh[(h + i) & (NEIGH_SLOTS - 1)];
    if (!n->used) return NULL;
    if (memcmp(&n->peer, peer, 16) == 0) return n;
  }
  return NULL;
}

static void neigh_set(stoq_xsk *x, const struct in6_addr *peer, const uint8_t mac[6], const struct in6_addr *local) {
  uint32_t h = neigh_hash(peer);
  struct neigh *slot = NULL;
  for (int i = 0; i < NEIGH_PROBE; i++) {
    struct neigh *n = &x->neigh[(h + i) & (NEIGH_SLOTS - 1)];
    if (!n->used || memcmp(&n->peer, peer, 16) == 0) {
      slot = n;
      break;
    }
  }
  if (!slot) slot = &x->neigh[h & (NEIGH_SLOTS - 1)]; /* full probe window: replace the home slot */
  if (slot->used && memcmp(&slot->peer, peer, 16) == 0 && memcmp(slot->mac, mac, 6) == 0 &&
      (!local || memcmp(&slot->local, local, 16) == 0))
    return;
  slot->peer = *peer;
  memcpy(slot->mac, mac, 6);
  if (local)
    slot->local = *local;
  else if (!slot->used)
    slot->local = x->default_local;
  slot->used = 1;
}

void stoq_xsk_learn_neighbour(stoq_xsk *x, const struct in6_addr *peer, const uint8_t mac[6]) {
  neigh_set(x, peer, mac, NULL);
}

/* One netlink dump of the kernel's IPv6 neighbour table for our interface. */
static void refresh_neighbours(stoq_xsk *x) {
  uint64_t t = now_ns();
  if (t - x->last_refresh < NEIGH_REFRESH_NS) return;
  x->last_refresh = t;
  x->c.neighbour_refreshes++;
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) return;
  struct {
    struct nlmsghdr nh;
    struct ndmsg nd;
  } req;
  memset(&req, 0, sizeof(req));
  req.nh.nlmsg_len = sizeof(req);
  req.nh.nlmsg_type = RTM_GETNEIGH;
  req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  req.nh.nlmsg_seq = 1;
  req.nd.ndm_family = AF_INET6;
  req.nd.ndm_ifindex = x->ifindex;
  if (send(fd, &req, sizeof(req), 0) < 0) {
    close(fd);
    return;
  }
  for (int done = 0; !done;) {
    ssize_t n = recv(fd, x->nl_buf, NL_BUF, 0);
    if (n <= 0) break;
    for (struct nlmsghdr *h = (struct nlmsghdr *)x->nl_buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) {
        done = 1;
        break;
      }
      if (h->nlmsg_type != RTM_NEWNEIGH) continue;
      struct ndmsg *nd = NLMSG_DATA(h);
      if (nd->ndm_ifindex != x->ifindex || nd->ndm_family != AF_INET6) continue;
      if (!(nd->ndm_state & (NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT))) continue;
      const struct in6_addr *dst = NULL;
      const uint8_t *ll = NULL;
      int alen = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*nd)));
      for (struct rtattr *a = (struct rtattr *)((char *)nd + NLMSG_ALIGN(sizeof(*nd))); RTA_OK(a, alen);
           a = RTA_NEXT(a, alen)) {
        if (a->rta_type == NDA_DST && RTA_PAYLOAD(a) == 16) dst = RTA_DATA(a);
        if (a->rta_type == NDA_LLADDR && RTA_PAYLOAD(a) == 6) ll = RTA_DATA(a);
      }
      if (dst && ll && !neigh_find(x, dst)) neigh_set(x, dst, ll, NULL);
    }
  }
  close(fd);
}

/* Asks the kernel to resolve `peer` (it does ND itself; the XDP program passes ICMPv6):
 * an empty datagram to the discard port from an ordinary socket. */
static void solicit(stoq_xsk *x, const struct in6_addr *peer) {
  if (x->solicit_fd < 0) return;
  struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(9), .sin6_addr = *peer};
  (void)sendto(x->solicit_fd, "", 0, MSG_DONTWAIT, (struct sockaddr *)&sa, sizeof(sa));
}

int stoq_xsk_interface_rx_queues(const char *ifname) {
  int ifindex = (int)if_nametoindex(ifname);
  if (ifindex == 0) return -ENODEV;
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) return -errno;
  struct {
    struct nlmsghdr nh;
    struct ifinfomsg ifi;
  } req;
  memset(&req, 0, sizeof(req));
  req.nh.nlmsg_len = sizeof(req);
  req.nh.nlmsg_type = RTM_GETLINK;
  req.nh.nlmsg_flags = NLM_F_REQUEST;
  req.ifi.ifi_family = AF_UNSPEC;
  req.ifi.ifi_index = ifindex;
  uint8_t buf[16384];
  int result = -EPROTO;
  ssize_t n = send(fd, &req, sizeof(req), 0) < 0 ? -1 : recv(fd, buf, sizeof(buf), 0);
  if (n < 0) result = -errno;
  for (struct nlmsghdr *h = (struct nlmsghdr *)buf; n > 0 && NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
    if (h->nlmsg_type != RTM_NEWLINK) continue;
    struct ifinfomsg *ifi = NLMSG_DATA(h);
    int alen = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*ifi)));
    for (struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, alen); a = RTA_NEXT(a, alen))
      if (a->rta_type == IFLA_NUM_RX_QUEUES && RTA_PAYLOAD(a) >= 4) memcpy(&result, RTA_DATA(a), 4);
  }
  close(fd);
  return result;
}

static void query_mode(stoq_xsk *x);

int stoq_xdp_query(const char *ifname, char *mode, size_t modelen, uint32_t *prog_id) {
  stoq_xsk probe;
  memset(&probe, 0, sizeof(probe));
  probe.ifindex = (int)if_nametoindex(ifname);
  if (probe.ifindex == 0) return -ENODEV;
  query_mode(&probe);
  snprintf(mode, modelen, "%s", probe.mode);
  *prog_id = probe.prog_id;
  return 0;
}

int stoq_xdp_read_stats(const char *pin_dir, uint64_t *out, int max) {
  char path[256];
  snprintf(path, sizeof(path), "%s/%s", pin_dir, STOQ_MAP_STATS);
  int fd = bpf_obj_get(path);
  if (fd < 0) return -errno;
  int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) {
    close(fd);
    return ncpu < 0 ? ncpu : -EINVAL;
  }
  uint64_t values[ncpu];
  int n = 0;
  for (uint32_t k = 0; k < STOQ_STAT_MAX && (int)k < max; k++) {
    if (bpf_map_lookup_elem(fd, &k, values) != 0) break;
    uint64_t sum = 0;
    for (int c = 0; c < ncpu; c++) sum += values[c];
    out[n++] = sum;
  }
  close(fd);
  return n;
}

const char *stoq_xdp_stat_name(int index, char *buf, size_t len) {
  static const char *names[] = {STOQ_STAT_NAMES};
  int named = (int)(sizeof(names) / sizeof(names[0]));
  if (index >= 0 && index < named) return names[index];
  snprintf(buf, len, "worker_%d", index - named);
  return buf;
}

/* ---- open / close ---- */

static int interface_address(const char *ifname, struct in6_addr *out) {
  struct ifaddrs *ifa, *p;
  if (getifaddrs(&ifa) != 0) return -1;
  int found = -1;
  for (p = ifa; p; p = p->ifa_next) {
    if (!p->ifa_addr || p->ifa_addr->sa_family != AF_INET6 || strcmp(p->ifa_name, ifname) != 0) continue;
    const struct in6_addr *a = &((struct sockaddr_in6 *)p->ifa_addr)->sin6_addr;
    if (IN6_IS_ADDR_LINKLOCAL(a)) continue;
    *out = *a;
    found = 0;
    break;
  }
  freeifaddrs(ifa);
  return found;
}

static void query_mode(stoq_xsk *x) {
  LIBBPF_OPTS(bpf_xdp_query_opts, q);
  x->mode = "none";
  x->prog_id = 0;
  if (bpf_xdp_query(x->ifindex, 0, &q) != 0) return;
  switch (q.attach_mode) {
  case XDP_ATTACHED_DRV: x->mode = "native"; x->prog_id = q.drv_prog_id; break;
  case XDP_ATTACHED_SKB: x->mode = "skb"; x->prog_id = q.skb_prog_id; break;
  case XDP_ATTACHED_HW: x->mode = "hw"; x->prog_id = q.hw_prog_id; break;
  case XDP_ATTACHED_MULTI: x->mode = "multi"; x->prog_id = q.drv_prog_id ? q.drv_prog_id : q.skb_prog_id; break;
  default: break;
  }
}

static uint32_t pow2_at_least(uint32_t v) {
  uint32_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

static int kernel_at_least(int major, int minor) {
  struct utsname u;
  int a = 0, b = 0;
  if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &a, &b) != 2) return 0;
  return a > major || (a == major && b >= minor);
}

/* Registers the UMEM on the socket: with TX metadata room where the kernel has it (6.11
 * wants the flag, 6.8-6.10 refuse it), else without. Returns 0 or -errno. */
static int register_umem(stoq_xsk *x) {
  struct stoq_umem_reg r = {.addr = (uint64_t)(uintptr_t)x->area, .len = x->area_len, .chunk_size = x->frame_size};
  if (kernel_at_least(6, 8)) {
    r.tx_metadata_len = TX_META_LEN;
    r.flags = STOQ_UMEM_TX_METADATA_LEN;
    if (setsockopt(x->fd, SOL_XDP, XDP_UMEM_REG, &r, sizeof(r)) == 0) goto metadata;
    r.flags = 0;
    if (setsockopt(x->fd, SOL_XDP, XDP_UMEM_REG, &r, sizeof(r)) == 0) goto metadata;
    r.tx_metadata_len = 0;
  }
  struct xdp_umem_reg plain = {.addr = r.addr, .len = r.len, .chunk_size = r.chunk_size};
  return setsockopt(x->fd, SOL_XDP, XDP_UMEM_REG, &plain, sizeof(plain)) == 0 ? 0 : -errno;
metadata:
  x->tx_off = TX_META_LEN;
  return 0;
}

/* Maps ring `which` (entries of `entry` bytes) and fills in libxdp's ring view of it. */
static int map_ring(stoq_xsk *x, int which, const struct xdp_ring_offset *o, uint32_t n, size_t entry, off_t pgoff,
                    struct xsk_ring_prod *prod, struct xsk_ring_cons *cons) {
  size_t len = o->desc + (size_t)n * entry;
  uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, x->fd, pgoff);
  if (m == MAP_FAILED) return -errno;
  x->ring_map[which] = m;
  x->ring_len[which] = len;
  uint32_t *producer = (uint32_t *)(m + o->producer), *consumer = (uint32_t *)(m + o->consumer);
  if (prod) {
    *prod = (struct xsk_ring_prod){.cached_prod = *producer, .cached_cons = *consumer + n, .mask = n - 1, .size = n,
                                   .producer = producer, .consumer = consumer, .ring = m + o->desc,
                                   .flags = (uint32_t *)(m + o->flags)};
  } else {
    *cons = (struct xsk_ring_cons){.cached_prod = *producer, .cached_cons = *consumer, .mask = n - 1, .size = n,
                                   .producer = producer, .consumer = consumer, .ring = m + o->desc,
                                   .flags = (uint32_t *)(m + o->flags)};
  }
  return 0;
}

/* The AF_XDP socket, its UMEM and its four rings. Sets `step` to what failed. */
static int create_socket(stoq_xsk *x, const char **step) {
  x->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
  if (x->fd < 0) return *step = "socket(AF_XDP)", -errno;
  int rc = register_umem(x);
  if (rc) return *step = "setsockopt(XDP_UMEM_REG)", rc;
  uint32_t fill = x->cfg.ring_size, comp = pow2_at_least(x->tx_frames), ring = x->cfg.ring_size;
  if (setsockopt(x->fd, SOL_XDP, XDP_UMEM_FILL_RING, &fill, sizeof(fill)) ||
      setsockopt(x->fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &comp, sizeof(comp)) ||
      setsockopt(x->fd, SOL_XDP, XDP_RX_RING, &ring, sizeof(ring)) ||
      setsockopt(x->fd, SOL_XDP, XDP_TX_RING, &ring, sizeof(ring)))
    return *step = "setsockopt(ring sizes)", -errno;
  struct xdp_mmap_offsets off;
  socklen_t ol = sizeof(off);
  if (getsockopt(x->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &ol)) return *step = "getsockopt(XDP_MMAP_OFFSETS)", -errno;
  *step = "mmap(rings)";
  if ((rc = map_ring(x, 0, &off.fr, fill, sizeof(uint64_t), XDP_UMEM_PGOFF_FILL_RING, &x->fill, NULL)) ||
      (rc = map_ring(x, 1, &off.cr, comp, sizeof(uint64_t), XDP_UMEM_PGOFF_COMPLETION_RING, NULL, &x->comp)) ||
      (rc = map_ring(x, 2, &off.rx, ring, sizeof(struct xdp_desc), XDP_PGOFF_RX_RING, NULL, &x->rx)) ||
      (rc = map_ring(x, 3, &off.tx, ring, sizeof(struct xdp_desc), XDP_PGOFF_TX_RING, &x->tx, NULL)))
    return rc;
  return 0;
}

/* Binds to the queue. A socket just closed on this queue (a restarted node) can hold it for
 * a moment while its last transmitted frames are freed: EBUSY then, so retry for up to a second. */
static int bind_socket(stoq_xsk *x, uint16_t bind_flags) {
  struct sockaddr_xdp sa = {.sxdp_family = AF_XDP, .sxdp_ifindex = (uint32_t)x->ifindex,
                            .sxdp_queue_id = x->cfg.queue_id, .sxdp_flags = bind_flags | XDP_USE_NEED_WAKEUP};
  int rc = -EBUSY;
  for (int i = 0; i < 20 && rc == -EBUSY; i++) {
    if (i) usleep(50000);
    rc = bind(x->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 ? 0 : -errno;
  }
  return rc;
}

stoq_xsk *stoq_xsk_open(const stoq_xsk_config *cfg, char *err, size_t errlen) {
  stoq_xsk *x = calloc(1, sizeof(*x));
  if (!x) {
    set_err(err, errlen, "calloc: out of memory");
    return NULL;
  }
  x->cfg = *cfg;
  x->fd = -1;
  x->map_fd = -1;
  x->solicit_fd = -1;
  x->wake_fd = -1;
  x->frame_size = cfg->frame_size ? cfg->frame_size : 2048;
  if (x->cfg.ring_size == 0) x->cfg.ring_size = 2048;
  x->cfg.ring_size = pow2_at_least(x->cfg.ring_size);
  x->nframes = cfg->frame_count ? cfg->frame_count : 4 * x->cfg.ring_size;
  if (x->frame_size != 2048 && x->frame_size != 4096) {
    set_err(err, errlen, "frame_size: %u is not 2048 or 4096", x->frame_size);
    goto fail;
  }
  if (x->nframes <= x->cfg.ring_size) {
    set_err(err, errlen, "frame_count: %u must exceed ring_size %u (the fill ring takes ring_size frames)",
            x->nframes, x->cfg.ring_size);
    goto fail;
  }
  x->rx_frames = x->cfg.ring_size;
  x->nslots = (x->nframes - x->rx_frames) / SLOT_FRAMES;
  if (x->nslots == 0) {
    set_err(err, errlen, "frame_count: %u leaves no transmit slot (%u frames each) after the fill ring's %u", x->nframes,
            SLOT_FRAMES, x->rx_frames);
    goto fail;
  }
  x->tx_frames = x->nslots * SLOT_FRAMES;
  x->nframes = x->rx_frames + x->tx_frames;
  x->slot_bytes = SLOT_FRAMES * x->frame_size;
  x->tx_base = (uint64_t)x->rx_frames * x->frame_size;
  x->ifindex = (int)if_nametoindex(cfg->ifname);
  if (x->ifindex == 0) {
    set_err(err, errlen, "if_nametoindex: no interface %s", cfg->ifname);
    goto fail;
  }
  x->port_be = cfg->local.sin6_port;
  if (!is_any(&cfg->local.sin6_addr))
    x->default_local = cfg->local.sin6_addr;
  else if (interface_address(cfg->ifname, &x->default_local) != 0) {
    set_err(err, errlen, "getifaddrs: %s has no global IPv6 address", cfg->ifname);
    goto fail;
  }

  {
    int s = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", cfg->ifname);
    int rc = s >= 0 ? ioctl(s, SIOCGIFHWADDR, &ifr) : -1;
    if (rc != 0) {
      set_err(err, errlen, "SIOCGIFHWADDR: %s: %s", cfg->ifname, strerror(errno));
      if (s >= 0) close(s);
      goto fail;
    }
    memcpy(x->mac, ifr.ifr_hwaddr.sa_data, 6);
    x->solicit_fd = s;
  }

  query_mode(x);
  if (x->prog_id == 0) {
    set_err(err, errlen, "bpf_xdp_query: no XDP program attached to %s (run scripts/xdp-attach %s)", cfg->ifname,
            cfg->ifname);
    goto fail;
  }
  {
    char path[192];
    snprintf(path, sizeof(path), "%s/%s", cfg->pin_dir, STOQ_MAP_XSK);
    x->map_fd = bpf_obj_get(path);
    if (x->map_fd < 0) {
      set_err(err, errlen, "bpf_obj_get: %s: %s (attach with scripts/xdp-attach %s)", path, strerror(errno),
              cfg->ifname);
      goto fail;
    }
    snprintf(path, sizeof(path), "%s/%s", cfg->pin_dir, STOQ_MAP_PORTS);
    int ports = bpf_obj_get(path);
    if (ports < 0) {
      set_err(err, errlen, "bpf_obj_get: %s: %s", path, strerror(errno));
      goto fail;
    }
    uint16_t port = ntohs(x->port_be);
    uint8_t one = 1;
    int rc = bpf_map_update_elem(ports, &port, &one, BPF_ANY);
    close(ports);
    if (rc != 0) {
      set_err(err, errlen, "bpf_map_update_elem: %s port %u: %s", STOQ_MAP_PORTS, port, strerror(errno));
      goto fail;
    }
  }

  x->area_len = (size_t)x->nframes * x->frame_size;
  x->area = mmap(NULL, x->area_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (x->area == MAP_FAILED) {
    x->area = NULL;
    set_err(err, errlen, "mmap: UMEM of %zu bytes: %s", x->area_len, strerror(errno));
    goto fail;
  }
  {
    const char *step = "";
    int rc = create_socket(x, &step);
    if (rc) {
      set_err(err, errlen, "%s: %s queue %u: %s", step, cfg->ifname, cfg->queue_id, strerror(-rc));
      goto fail;
    }
    if (cfg->zero_copy == STOQ_XSK_ZC_OFF) {
      rc = bind_socket(x, XDP_COPY);
    } else {
      rc = bind_socket(x, XDP_ZEROCOPY);
      if (rc && cfg->zero_copy == STOQ_XSK_ZC_AUTO) rc = bind_socket(x, XDP_COPY);
    }
    if (rc) {
      set_err(err, errlen, "bind(AF_XDP): %s queue %u (%s): %s%s", cfg->ifname, cfg->queue_id,
              cfg->zero_copy == STOQ_XSK_ZC_ON ? "zero-copy" : "copy", strerror(-rc),
              rc == -EBUSY ? " (another AF_XDP socket holds this queue: is another stoq-node using the interface?)" : "");
      goto fail;
    }
    x->bound = 1;
    struct xdp_options o;
    socklen_t ol = sizeof(o);
    x->zc = getsockopt(x->fd, SOL_XDP, XDP_OPTIONS, &o, &ol) == 0 && (o.flags & XDP_OPTIONS_ZEROCOPY);
    /* Copy mode always honours the checksum request (the NIC, else the kernel's software
     * fallback); a zero-copy driver may not, and whether it does is not probed yet. */
    x->tx_csum_offload = x->tx_off != 0 && !x->zc;
  }
  if (cfg->busy_poll_usec) {
    int one = 1, usec = (int)cfg->busy_poll_usec, budget = 64;
    setsockopt(x->fd, SOL_SOCKET, SO_PREFER_BUSY_POLL, &one, sizeof(one));
    setsockopt(x->fd, SOL_SOCKET, SO_BUSY_POLL, &usec, sizeof(usec));
    setsockopt(x->fd, SOL_SOCKET, SO_BUSY_POLL_BUDGET, &budget, sizeof(budget));
  }

  x->slot_free = calloc(x->nslots, sizeof(uint32_t));
  x->slot_refs = calloc(x->nslots, sizeof(uint16_t));
  x->held = calloc(x->cfg.ring_size, sizeof(uint64_t));
  x->neigh = calloc(NEIGH_SLOTS, sizeof(struct neigh));
  x->nl_buf = malloc(NL_BUF);
  if (!x->slot_free || !x->slot_refs || !x->held || !x->neigh || !x->nl_buf) {
    set_err(err, errlen, "calloc: out of memory");
    goto fail;
  }
  /* Frames [0, rx_frames) feed the fill ring; the rest are the transmit pool. */
  {
    uint32_t idx;
    if (xsk_ring_prod__reserve(&x->fill, x->rx_frames, &idx) != x->rx_frames) {
      set_err(err, errlen, "xsk_ring_prod__reserve: fill ring smaller than %u", x->rx_frames);
      goto fail;
    }
    for (uint32_t i = 0; i < x->rx_frames; i++)
      *xsk_ring_prod__fill_addr(&x->fill, idx + i) = (uint64_t)i * x->frame_size;
    xsk_ring_prod__submit(&x->fill, x->rx_frames);
    x->kernel_rx = x->rx_frames;
    for (uint32_t i = 0; i < x->nslots; i++) x->slot_free[i] = x->nslots - 1 - i;
    x->n_slot_free = x->nslots;
  }
  {
    uint32_t key = cfg->xsk_map_index;
    int fd = x->fd;
    if (bpf_map_update_elem(x->map_fd, &key, &fd, BPF_ANY) != 0) {
      set_err(err, errlen, "bpf_map_update_elem: %s[%u]: %s", STOQ_MAP_XSK, key, strerror(errno));
      goto fail;
    }
  }
  refresh_neighbours(x);
  return x;
fail:
  stoq_xsk_close(x);
  return NULL;
}

void stoq_xsk_close(stoq_xsk *x) {
  if (!x) return;
  if (x->map_fd >= 0) {
    uint32_t key = x->cfg.xsk_map_index;
    if (x->bound) bpf_map_delete_elem(x->map_fd, &key);
    close(x->map_fd);
  }
  for (int i = 0; i < 4; i++)
    if (x->ring_map[i]) munmap(x->ring_map[i], x->ring_len[i]);
  if (x->fd >= 0) close(x->fd);
  if (x->area) munmap(x->area, x->area_len);
  if (x->solicit_fd >= 0) close(x->solicit_fd);
  free(x->slot_free);
  free(x->slot_refs);
  free(x->held);
  free(x->neigh);
  free(x->nl_buf);
  free(x);
}

int stoq_xsk_zero_copy(const stoq_xsk *x) { return x->zc; }
const char *stoq_xsk_xdp_mode(const stoq_xsk *x) { return x->mode; }

int stoq_xsk_program_attached(stoq_xsk *x) {
  __u32 id = 0;
  if (bpf_xdp_query_id(x->ifindex, 0, &id) != 0) return 1; /* cannot tell: assume still there */
  return id != 0;
}

void stoq_xsk_local(const stoq_xsk *x, struct sockaddr_in6 *out) {
  memset(out, 0, sizeof(*out));
  out->sin6_family = AF_INET6;
  out->sin6_port = x->port_be;
  out->sin6_addr = is_any(&x->cfg.local.sin6_addr) ? x->cfg.local.sin6_addr : x->default_local;
}

const stoq_xsk_counters *stoq_xsk_get_counters(stoq_xsk *x) {
  struct xdp_statistics s;
  socklen_t l = sizeof(s);
  if (x->fd >= 0 && getsockopt(x->fd, SOL_XDP, XDP_STATISTICS, &s, &l) == 0) {
    x->c.k_rx_dropped = s.rx_dropped;
    x->c.k_rx_invalid_descs = s.rx_invalid_descs;
    x->c.k_tx_invalid_descs = s.tx_invalid_descs;
    x->c.k_rx_ring_full = s.rx_ring_full;
    x->c.k_fill_ring_empty = s.rx_fill_ring_empty_descs;
    x->c.k_tx_ring_empty = s.tx_ring_empty_descs;
  }
  return &x->c;
}

stoq_xsk_frames stoq_xsk_get_frames(const stoq_xsk *x) {
  uint32_t busy = x->nslots - x->n_slot_free - (uint32_t)x->has_reserved;
  stoq_xsk_frames f = {
      .total = x->nframes,
      .kernel_rx = x->kernel_rx,
      .held = x->n_held,
      .tx_free = x->n_slot_free * SLOT_FRAMES,
      .tx_reserved = (uint32_t)x->has_reserved * SLOT_FRAMES,
      .tx_in_flight = busy * SLOT_FRAMES,
  };
  return f;
}

uint32_t stoq_xsk_slot_size(const stoq_xsk *x) { return x->slot_bytes - x->tx_off - STOQ_XSK_HEADROOM; }
int stoq_xsk_tx_checksum_offload(const stoq_xsk *x) { return x->tx_csum_offload; }
uint32_t stoq_xsk_slot_frames(const stoq_xsk *x) { (void)x; return SLOT_FRAMES; }
uint32_t stoq_xsk_stride(const stoq_xsk *x) { return x->frame_size; }

/* ---- receive ---- */

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

/* Parses one frame; fills `out` and returns 1 for a UDP datagram to our port, else 0. */
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
    struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000ull), .tv_nsec = (long)(timeout_ns % 1000000000ull)};
    int rc = ppoll(pfd, x->wake_fd >= 0 ? 2 : 1, &ts, NULL);
    if (rc < 0 && errno != EINTR) return -errno;
    if (rc > 0 && (pfd[1].revents & POLLIN)) {
      uint64_t v;
      if (read(x->wake_fd, &v, sizeof(v)) < 0) { /* already drained */ }
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

void stoq_xsk_tx_commit(stoq_xsk *x, size_t len, size_t segment_size, const struct sockaddr_in6 *to, uint8_t ecn) {
  if (!x->has_reserved) return;
  x->has_reserved = 0;
  uint32_t slot = x->reserved;
  size_t stride = x->frame_size, room = x->frame_size - x->tx_off - STOQ_XSK_HEADROOM;
  uint32_t nseg = (segment_size == 0 || len <= segment_size) ? 1 : (uint32_t)((len + stride - 1) / stride);
  struct neigh *nb = neigh_find(x, &to->sin6_addr);
  if (!nb) {
    refresh_neighbours(x);
    nb = neigh_find(x, &to->sin6_addr);
  }
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
  const struct in6_addr *src = is_any(&x->cfg.local.sin6_addr) ? &nb->local : &x->cfg.local.sin6_addr;
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
