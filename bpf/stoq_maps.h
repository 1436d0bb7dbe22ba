/* The maps of stoq_xdp.bpf.c; user space finds them by the names in stoq_kern_user.h. */
#ifndef STOQ_MAPS_H
#define STOQ_MAPS_H
#include "stoq_kern_user.h"

/* AF_XDP sockets, indexed by receive queue (or by worker when steering by CID). */
struct {
  __uint(type, BPF_MAP_TYPE_XSKMAP);
  __uint(max_entries, STOQ_MAX_SOCKETS);
  __type(key, __u32);
  __type(value, __u32);
  __uint(pinning, LIBBPF_PIN_BY_NAME); /* pinned under the loader's pin path */
} xsk_map SEC(".maps");

/* The node's UDP ports (host order) → 1. */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, STOQ_MAX_PORTS);
  __type(key, __u16);
  __type(value, __u8);
  __uint(pinning, LIBBPF_PIN_BY_NAME); /* pinned under the loader's pin path */
} stoq_ports SEC(".maps");

/* One struct stoq_config: worker count and steering flags. */
struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, 1);
  __type(key, __u32);
  __type(value, struct stoq_config);
  __uint(pinning, LIBBPF_PIN_BY_NAME); /* pinned under the loader's pin path */
} stoq_config SEC(".maps");

/* Per-CPU counters, one per enum stoq_stat. */
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, STOQ_STAT_MAX);
  __type(key, __u32);
  __type(value, __u64);
  __uint(pinning, LIBBPF_PIN_BY_NAME); /* pinned under the loader's pin path */
} stoq_xdp_stats SEC(".maps");

#endif
