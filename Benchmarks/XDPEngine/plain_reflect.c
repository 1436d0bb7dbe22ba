/* The ceiling for scripts/bench-xdp-engine: the plainest libxdp receive/transmit loop.
 * Each received frame goes back out in place (MACs, addresses and ports swapped, so the
 * UDP checksum stays valid), and completed frames return straight to the fill ring.
 * No parsing, no copies, no checksums: what any AF_XDP engine's per-packet cost is
 * measured against. Registers its socket in the XDP program's pinned xsk_map. */
#define _GNU_SOURCE
#include <bpf/bpf.h>
#include <errno.h>
#include <linux/if_xdp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <xdp/xsk.h>

#define FRAMES 4096
#define FRAME 2048
#define RING 2048
#define BATCH 64

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void swap(unsigned char *a, unsigned char *b, size_t n) {
  unsigned char t[16];
  memcpy(t, a, n);
  memcpy(a, b, n);
  memcpy(b, t, n);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: plain_reflect <iface> <queue> <pin dir> <seconds>\n");
    return 2;
  }
  const char *ifname = argv[1];
  unsigned queue = (unsigned)atoi(argv[2]);
  double seconds = atof(argv[4]);
  void *area =
      mmap(NULL, (size_t)FRAMES * FRAME, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  struct xsk_ring_prod fill, tx;
  struct xsk_ring_cons comp, rx;
  struct xsk_umem *umem;
  struct xsk_umem_config uc = {.fill_size = RING * 2, .comp_size = RING * 2, .frame_size = FRAME};
  int rc = xsk_umem__create(&umem, area, (size_t)FRAMES * FRAME, &fill, &comp, &uc);
  if (rc) {
    fprintf(stderr, "xsk_umem__create: %s\n", strerror(-rc));
    return 1;
  }
  struct xsk_socket *xsk;
  struct xsk_socket_config sc = {.rx_size = RING,
                                 .tx_size = RING,
                                 .libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
                                 .bind_flags = XDP_USE_NEED_WAKEUP | XDP_COPY};
  rc = -EBUSY;
  for (int i = 0; i < 40 && rc == -EBUSY; i++) { /* the previous run's socket may still hold the queue */
    if (i) usleep(50000);
    rc = xsk_socket__create(&xsk, ifname, queue, umem, &rx, &tx, &sc);
  }
  if (rc) {
    fprintf(stderr, "xsk_socket__create: %s\n", strerror(-rc));
    return 1;
  }
  int fd = xsk_socket__fd(xsk);
  char path[256];
  snprintf(path, sizeof(path), "%s/xsk_map", argv[3]);
  int map = bpf_obj_get(path);
  if (map < 0 || bpf_map_update_elem(map, &queue, &fd, 0) != 0) {
    fprintf(stderr, "xsk_map %s: %s\n", path, strerror(errno));
    return 1;
  }
  uint32_t idx = 0;
  if (xsk_ring_prod__reserve(&fill, FRAMES, &idx) != FRAMES) return 1;
  for (uint32_t i = 0; i < FRAMES; i++) *xsk_ring_prod__fill_addr(&fill, idx + i) = (uint64_t)i * FRAME;
  xsk_ring_prod__submit(&fill, FRAMES);

  unsigned long long reflected = 0;
  double end = now() + seconds;
  struct pollfd pfd = {.fd = fd, .events = POLLIN};
  while (now() < end) {
    uint32_t ri, ti;
    uint32_t n = xsk_ring_cons__peek(&rx, BATCH, &ri);
    if (n == 0) {
      poll(&pfd, 1, 1);
      continue;
    }
    while (xsk_ring_prod__reserve(&tx, n, &ti) != n) sendto(fd, NULL, 0, MSG_DONTWAIT, NULL, 0);
    for (uint32_t i = 0; i < n; i++) {
      const struct xdp_desc *d = xsk_ring_cons__rx_desc(&rx, ri + i);
      unsigned char *f = (unsigned char *)area + d->addr;
      swap(f, f + 6, 6);        /* Ethernet */
      swap(f + 22, f + 38, 16); /* IPv6 source and destination */
      swap(f + 54, f + 56, 2);  /* UDP ports */
      struct xdp_desc *t = xsk_ring_prod__tx_desc(&tx, ti + i);
      t->addr = d->addr;
      t->len = d->len;
    }
    xsk_ring_cons__release(&rx, n);
    xsk_ring_prod__submit(&tx, n);
    reflected += n;
    while (sendto(fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno == EAGAIN) {
    }
    uint32_t ci;
    uint32_t c = xsk_ring_cons__peek(&comp, RING * 2, &ci);
    if (c) {
      uint32_t fi;
      while (xsk_ring_prod__reserve(&fill, c, &fi) != c) {
      }
      for (uint32_t i = 0; i < c; i++)
        *xsk_ring_prod__fill_addr(&fill, fi + i) = *xsk_ring_cons__comp_addr(&comp, ci + i);
      xsk_ring_prod__submit(&fill, c);
      xsk_ring_cons__release(&comp, c);
    }
  }
  bpf_map_delete_elem(map, &queue);
  printf("%llu\n", reflected);
  xsk_socket__delete(xsk);
  xsk_umem__delete(umem);
  return 0;
}
