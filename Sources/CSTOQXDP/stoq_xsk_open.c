/*
 * Opening and closing an AF_XDP socket: the UMEM, its registration (with TX metadata room
 * where the kernel has it), the four rings, the bind, the XSKMAP entry; and the socket's
 * read-only accessors.
 *
 * Why C: the socket is set up by hand, not by libxdp, because Debian 12's headers and libxdp
 * 1.3.1 predate TX metadata (Linux 6.8 / 6.11); the ring offsets, mmap layout and setsockopt
 * structs are kernel ABI that Swift cannot import cleanly.
 */
#define _GNU_SOURCE
#include "stoq_xsk_internal.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <linux/netlink.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "stoq_kern_user.h"

static void set_err(char *err, size_t n, const char *fmt, ...) {
  if (!err || !n) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, n, fmt, ap);
  va_end(ap);
}

/* The capability (or ownership) a failed step lacked, for a node that runs with only the ones
 * it needs: the one place in the node that names them. deploy/capabilities lists the same set
 * for the systemd unit and the DaemonSet; Tests/interop/test_deploy_caps.py drops each in turn
 * and expects its name here. "" when the errno says nothing about privilege. */
static const char *privilege_hint(const char *step, int e) {
  if (strcmp(step, "socket(AF_XDP)") == 0 && e == EPERM) return " (needs CAP_NET_RAW)";
  /* The kernel charges the UMEM to RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK. */
  if (strcmp(step, "setsockopt(XDP_UMEM_REG)") == 0 && (e == ENOBUFS || e == ENOMEM || e == EPERM))
    return " (the UMEM is locked memory beyond RLIMIT_MEMLOCK: needs CAP_IPC_LOCK, or a memlock limit above "
           "frames x frame_size per queue)";
  if (strcmp(step, "bpf_obj_get") == 0 && e == EACCES)
    return " (the pinned maps belong to another user: scripts/xdp-attach --owner USER gives them to the node's)";
  /* Before Linux 6.5, kernel.unprivileged_bpf_disabled refused every bpf() call without CAP_BPF. */
  if (strcmp(step, "bpf_obj_get") == 0 && e == EPERM)
    return " (needs CAP_BPF on this kernel: before Linux 6.5 kernel.unprivileged_bpf_disabled covers every bpf() call)";
  return "";
}

static uint32_t pow2_at_least(uint32_t v) {
  uint32_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

/* Twice as many slots as peers (see NEIGH_MIN_SLOTS), a power of two, so that the table evicts
 * a peer the worker still talks to only past its connection limit. */
uint32_t stoq_xsk_neighbour_slots(uint32_t peers) {
  if (peers == 0) peers = STOQ_XSK_DEFAULT_NEIGHBOUR_PEERS;
  if (peers > NEIGH_MAX_SLOTS / 2) return NEIGH_MAX_SLOTS;
  uint32_t slots = pow2_at_least(2 * peers);
  return slots < NEIGH_MIN_SLOTS ? NEIGH_MIN_SLOTS : slots;
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
    *prod = (struct xsk_ring_prod){.cached_prod = *producer,
                                   .cached_cons = *consumer + n,
                                   .mask = n - 1,
                                   .size = n,
                                   .producer = producer,
                                   .consumer = consumer,
                                   .ring = m + o->desc,
                                   .flags = (uint32_t *)(m + o->flags)};
  } else {
    *cons = (struct xsk_ring_cons){.cached_prod = *producer,
                                   .cached_cons = *consumer,
                                   .mask = n - 1,
                                   .size = n,
                                   .producer = producer,
                                   .consumer = consumer,
                                   .ring = m + o->desc,
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
  struct sockaddr_xdp sa = {.sxdp_family = AF_XDP,
                            .sxdp_ifindex = (uint32_t)x->ifindex,
                            .sxdp_queue_id = x->cfg.queue_id,
                            .sxdp_flags = bind_flags | XDP_USE_NEED_WAKEUP};
  int rc = -EBUSY;
  for (int i = 0; i < 20 && rc == -EBUSY; i++) {
    if (i) usleep(50000);
    rc = bind(x->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 ? 0 : -errno;
  }
  return rc;
}

/* The kernel's id of the map `fd` refers to (0: cannot tell). */
static uint32_t map_id(int fd) {
  struct bpf_map_info info;
  uint32_t len = sizeof(info);
  memset(&info, 0, sizeof(info));
  return bpf_obj_get_info_by_fd(fd, &info, &len) == 0 ? info.id : 0;
}

/* Claims the node's port in the pinned stoq_ports at its listen address (all zero for [::]),
 * so that the program steers the port there only (struct stoq_port). Every socket of the node
 * writes the same entry. 0, or -1 with `err`. */
static int register_port(stoq_xsk *x, char *err, size_t errlen) {
  char path[192];
  snprintf(path, sizeof(path), "%s/%s", x->cfg.pin_dir, STOQ_MAP_PORTS);
  int ports = bpf_obj_get(path);
  if (ports < 0) {
    int e = errno;
    set_err(err, errlen, "bpf_obj_get: %s: %s%s", path, strerror(e), privilege_hint("bpf_obj_get", e));
    return -1;
  }
  uint16_t port = ntohs(x->port_be);
  struct stoq_port owner;
  memcpy(owner.addr, &x->cfg.local.sin6_addr, sizeof(owner.addr));
  int rc = bpf_map_update_elem(ports, &port, &owner, BPF_ANY);
  int e = errno;
  close(ports);
  if (rc != 0) {
    set_err(err, errlen, "bpf_map_update_elem: %s port %u: %s", STOQ_MAP_PORTS, port, strerror(e));
    return -1;
  }
  return 0;
}

/* Busy polling is best effort and all or nothing: the kernel grants SO_PREFER_BUSY_POLL, and
 * a raised SO_BUSY_POLL_BUDGET, only with CAP_NET_ADMIN, which no deployment gives the node
 * (SO_BUSY_POLL itself it grants anyone). Half of it — polling that does not defer the
 * device's interrupts — is neither what was asked nor what the node says: on the first
 * refusal the socket goes back to interrupts, and the refusal is kept for the node to say
 * once. */
static void set_busy_poll(stoq_xsk *x, uint32_t usec) {
  int one = 1, us = (int)usec, budget = 64;
  const struct {
    int opt;
    const char *name;
    const int *value;
  } opts[] = {{SO_PREFER_BUSY_POLL, "SO_PREFER_BUSY_POLL", &one},
              {SO_BUSY_POLL, "SO_BUSY_POLL", &us},
              {SO_BUSY_POLL_BUDGET, "SO_BUSY_POLL_BUDGET", &budget}};
  for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
    if (setsockopt(x->fd, SOL_SOCKET, opts[i].opt, opts[i].value, sizeof(int)) == 0 || x->busy_poll_refused[0])
      continue;
    snprintf(x->busy_poll_refused, sizeof(x->busy_poll_refused), "setsockopt(%s): %s%s", opts[i].name, strerror(errno),
             errno == EPERM ? " (needs CAP_NET_ADMIN)" : "");
  }
  if (x->busy_poll_refused[0]) {
    int zero = 0;
    (void)setsockopt(x->fd, SOL_SOCKET, SO_BUSY_POLL, &zero, sizeof(zero));
  }
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
  x->nl_fd = -1;
  x->wake_fd = -1;
  x->frame_size = cfg->frame_size ? cfg->frame_size : 2048;
  if (x->cfg.ring_size == 0) x->cfg.ring_size = 8192;
  x->cfg.ring_size = pow2_at_least(x->cfg.ring_size);
  x->nframes = cfg->frame_count ? cfg->frame_count : 4 * x->cfg.ring_size;
  if (x->frame_size != 2048 && x->frame_size != 4096) {
    set_err(err, errlen, "frame_size: %u is not 2048 or 4096", x->frame_size);
    goto fail;
  }
  if (x->nframes <= x->cfg.ring_size) {
    set_err(err, errlen, "frame_count: %u must exceed ring_size %u (the fill ring takes ring_size frames)", x->nframes,
            x->cfg.ring_size);
    goto fail;
  }
  x->rx_frames = x->cfg.ring_size;
  x->nslots = (x->nframes - x->rx_frames) / SLOT_FRAMES;
  if (x->nslots == 0) {
    set_err(err, errlen, "frame_count: %u leaves no transmit slot (%u frames each) after the fill ring's %u",
            x->nframes, SLOT_FRAMES, x->rx_frames);
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
  if (!is_any(&cfg->local.sin6_addr)) x->default_local = cfg->local.sin6_addr;
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
    x->nl_fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (x->nl_fd < 0) {
      set_err(err, errlen, "socket(AF_NETLINK): %s", strerror(errno));
      goto fail;
    }
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
      int e = errno;
      if (e == ENOENT)
        set_err(err, errlen, "bpf_obj_get: %s: %s (attach with scripts/xdp-attach %s)", path, strerror(e), cfg->ifname);
      else set_err(err, errlen, "bpf_obj_get: %s: %s%s", path, strerror(e), privilege_hint("bpf_obj_get", e));
      goto fail;
    }
    /* Before the socket or the port goes into maps another build laid out. */
    if (stoq_xdp_check_maps(cfg->pin_dir, err, errlen) != 0) goto fail;
    x->map_id = map_id(x->map_fd);
    snprintf(path, sizeof(path), "%s/progs/stoq_xdp", cfg->pin_dir);
    x->alone = access(path, F_OK) == 0; /* only xdp-attach's bpftool path pins the program */
    if (register_port(x, err, errlen) != 0) goto fail;
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
      set_err(err, errlen, "%s: %s queue %u: %s%s", step, cfg->ifname, cfg->queue_id, strerror(-rc),
              privilege_hint(step, -rc));
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
              rc == -EBUSY ? " (another AF_XDP socket holds this queue: is another stoq-node using the interface?)"
                           : "");
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
  if (cfg->busy_poll_usec) set_busy_poll(x, cfg->busy_poll_usec);

  x->slot_free = calloc(x->nslots, sizeof(uint32_t));
  x->slot_refs = calloc(x->nslots, sizeof(uint16_t));
  x->held = calloc(x->cfg.ring_size, sizeof(uint64_t));
  x->neigh_mask = stoq_xsk_neighbour_slots(cfg->neighbour_peers) - 1;
  x->neigh = calloc((size_t)x->neigh_mask + 1, sizeof(struct neigh));
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
  if (x->nl_fd >= 0) close(x->nl_fd);
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
  if (id == 0) return 0;
  /* Attached anew (scripts/xdp-attach run again): new maps are pinned, in which this socket is
   * not, and the program steers to them: as deaf as none. The map, not the program id, tells:
   * libxdp makes a new dispatcher when another program joins the interface, around the same
   * STOQ program and maps. */
  /* Attached alone (bpftool), no dispatcher can be re-made around it: the program id tells too
   * (STOQ's program taken off by hand, its pins left, another program attached). */
  if (x->alone && id != x->prog_id) return 0;
  char path[192];
  snprintf(path, sizeof(path), "%s/%s", x->cfg.pin_dir, STOQ_MAP_XSK);
  int fd = bpf_obj_get(path);
  /* Pins this node may not open (a re-attach by root without --owner): the program id. */
  if (fd < 0) return errno == ENOENT ? 0 : id == x->prog_id;
  uint32_t pinned = map_id(fd);
  close(fd);
  return pinned == 0 || x->map_id == 0 || pinned == x->map_id;
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
const char *stoq_xsk_busy_poll_refused(const stoq_xsk *x) { return x->busy_poll_refused; }
uint32_t stoq_xsk_slot_frames(const stoq_xsk *x) {
  (void)x;
  return SLOT_FRAMES;
}
uint32_t stoq_xsk_stride(const stoq_xsk *x) { return x->frame_size; }
