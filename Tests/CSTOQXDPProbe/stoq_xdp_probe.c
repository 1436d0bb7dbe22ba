/* See include/CSTOQXDPProbe.h. */
#include "CSTOQXDPProbe.h"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <linux/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stoq_kern_user.h"

struct stoq_xdp_probe {
  struct bpf_object *obj;
  int prog_fd, stats_fd;
  uint32_t workers;
  uint16_t port;
};

static uint64_t stat_sum(stoq_xdp_probe *p, uint32_t key) {
  int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) return 0;
  uint64_t *vals = calloc((size_t)ncpu, sizeof(uint64_t));
  if (!vals) return 0;
  uint64_t sum = 0;
  if (bpf_map_lookup_elem(p->stats_fd, &key, vals) == 0)
    for (int i = 0; i < ncpu; i++) sum += vals[i];
  free(vals);
  return sum;
}

stoq_xdp_probe *stoq_xdp_probe_open(const char *object, uint32_t workers, uint16_t port, char *err, size_t errlen) {
  if (workers < 1 || workers > STOQ_MAX_COUNTED_WORKERS) {
    snprintf(err, errlen, "workers must be 1 … %d", STOQ_MAX_COUNTED_WORKERS);
    return NULL;
  }
  stoq_xdp_probe *p = calloc(1, sizeof(*p));
  if (!p) return NULL;
  p->workers = workers;
  p->port = port;
  p->obj = bpf_object__open_file(object, NULL);
  if (!p->obj) {
    snprintf(err, errlen, "bpf_object__open_file(%s): %s", object, strerror(errno));
    free(p);
    return NULL;
  }
  struct bpf_map *m;
  bpf_object__for_each_map(m, p->obj) bpf_map__set_pin_path(m, NULL); /* never touch bpffs */
  int rv = bpf_object__load(p->obj);
  if (rv != 0) {
    snprintf(err, errlen, "bpf_object__load(%s): %s (needs CAP_BPF)", object, strerror(-rv));
    bpf_object__close(p->obj);
    free(p);
    return NULL;
  }
  p->prog_fd = bpf_program__fd(bpf_object__find_program_by_name(p->obj, "stoq_xdp"));
  p->stats_fd = bpf_map__fd(bpf_object__find_map_by_name(p->obj, STOQ_MAP_STATS));
  int config_fd = bpf_map__fd(bpf_object__find_map_by_name(p->obj, STOQ_MAP_CONFIG));
  int ports_fd = bpf_map__fd(bpf_object__find_map_by_name(p->obj, STOQ_MAP_PORTS));
  struct stoq_port every = {{0}}; /* the node listens on [::] */
  uint32_t zero = 0;
  struct stoq_config c = {.workers = workers, .flags = STOQ_F_STEER_BY_CID};
  if (bpf_map_update_elem(ports_fd, &port, &every, BPF_ANY) != 0 ||
      bpf_map_update_elem(config_fd, &zero, &c, BPF_ANY) != 0) {
    snprintf(err, errlen, "bpf_map_update_elem: %s", strerror(errno));
    stoq_xdp_probe_close(p);
    return NULL;
  }
  return p;
}

int stoq_xdp_probe_worker(stoq_xdp_probe *p, const uint8_t *payload, size_t len) {
  uint8_t frame[14 + 40 + 8 + 2048], out[sizeof(frame)];
  if (len > 2048) return -1001;
  memset(frame, 0, 14 + 40 + 8);
  frame[12] = 0x86;
  frame[13] = 0xdd;
  uint8_t *ip = frame + 14;
  ip[0] = 0x60;
  uint16_t pl = htons((uint16_t)(8 + len));
  memcpy(ip + 4, &pl, 2);
  ip[6] = 17;
  ip[7] = 64;
  ip[8] = 0xfd;
  ip[23] = 2;
  ip[24] = 0xfd;
  ip[39] = 1;
  uint8_t *udp = ip + 40;
  uint16_t sp = htons(50000), dp = htons(p->port), ul = htons((uint16_t)(8 + len));
  memcpy(udp, &sp, 2);
  memcpy(udp + 2, &dp, 2);
  memcpy(udp + 4, &ul, 2);
  memcpy(udp + 8, payload, len);

  uint64_t steered = stat_sum(p, STOQ_STAT_STEERED_BY_CID), before[STOQ_MAX_COUNTED_WORKERS];
  for (uint32_t w = 0; w < p->workers; w++) before[w] = stat_sum(p, STOQ_STAT_WORKER_0 + w);
  LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = frame, .data_size_in = (uint32_t)(14 + 40 + 8 + len), .data_out = out,
              .data_size_out = sizeof(out), .repeat = 1);
  if (bpf_prog_test_run_opts(p->prog_fd, &opts) != 0) return -1000 - errno;
  if (stat_sum(p, STOQ_STAT_STEERED_BY_CID) != steered + 1) return -1;
  int found = -1;
  for (uint32_t w = 0; w < p->workers; w++) {
    if (stat_sum(p, STOQ_STAT_WORKER_0 + w) == before[w] + 1) {
      if (found >= 0) return -1002; /* two counters moved: cannot tell */
      found = (int)w;
    }
  }
  return found;
}

void stoq_xdp_probe_close(stoq_xdp_probe *p) {
  if (!p) return;
  bpf_object__close(p->obj);
  free(p);
}
