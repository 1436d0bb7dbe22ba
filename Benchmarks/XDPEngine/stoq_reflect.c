/* STOQ's AF_XDP engine (Sources/CSTOQXDP, compiled in unchanged) reflecting datagrams
 * the way a worker moves them: receive a batch (parse + verify the UDP checksum), copy
 * the payloads into a transmit slot as a run of equal-size datagrams one frame apart
 * (consecutive datagrams from the same peer share a slot, as a QUIC run does), frame
 * each (Ethernet/IPv6/UDP + checksum), flush.
 * scripts/bench-xdp-engine compares it with plain_reflect.c in the same run. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <time.h>

#include "CSTOQXDP.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: stoq_reflect <iface> <queue> <pin dir> <ipv6> <port> <seconds>\n");
    return 2;
  }
  stoq_xsk_config cfg;
  memset(&cfg, 0, sizeof(cfg));
  snprintf(cfg.ifname, sizeof(cfg.ifname), "%s", argv[1]);
  cfg.queue_id = (uint32_t)atoi(argv[2]);
  cfg.xsk_map_index = cfg.queue_id;
  snprintf(cfg.pin_dir, sizeof(cfg.pin_dir), "%s", argv[3]);
  cfg.local.sin6_family = AF_INET6;
  inet_pton(AF_INET6, argv[4], &cfg.local.sin6_addr);
  cfg.local.sin6_port = htons((uint16_t)atoi(argv[5]));
  cfg.frame_size = 2048;
  cfg.frame_count = 16384; /* the node's default */
  cfg.ring_size = 2048;
  cfg.zero_copy = STOQ_XSK_ZC_AUTO;
  char err[256];
  stoq_xsk *x = stoq_xsk_open(&cfg, err, sizeof(err));
  if (!x) {
    fprintf(stderr, "stoq_reflect: %s\n", err);
    return 1;
  }
  static stoq_xsk_rx rx[64];
  unsigned long long reflected = 0;
  double end = now() + atof(argv[6]);
  while (now() < end) {
    int n = stoq_xsk_receive(x, 1000000, rx, 64);
    uint32_t stride = stoq_xsk_stride(x), per_slot = stoq_xsk_slot_frames(x);
    for (int i = 0; i < n;) {
      uint8_t *p = stoq_xsk_tx_reserve(x);
      if (!p) {
        stoq_xsk_flush(x);
        p = stoq_xsk_tx_reserve(x);
        if (!p) break;
      }
      /* A run: datagrams of the first one's size from the same peer (the last may be shorter). */
      uint32_t seg = rx[i].len, k = 0;
      size_t len = 0;
      while (i < n && k < per_slot && rx[i].len <= seg &&
             memcmp(&rx[i].peer, &rx[i - (int)k].peer, sizeof(rx[i].peer)) == 0) {
        memcpy(p + (size_t)k * stride, rx[i].data, rx[i].len);
        len = (size_t)k * stride + rx[i].len;
        k++;
        i++;
        if (rx[i - 1].len < seg) break;
      }
      stoq_xsk_tx_commit(x, len, seg, &rx[i - 1].peer, NULL, rx[i - 1].ecn);
      reflected += k;
    }
    stoq_xsk_rx_done(x);
    stoq_xsk_flush(x);
  }
  printf("%llu\n", reflected);
  stoq_xsk_close(x);
  return 0;
}
