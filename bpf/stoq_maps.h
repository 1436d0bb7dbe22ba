/* The maps of stoq_xdp.bpf.c; user space finds them by the names in stoq_kern_user.h. */
#ifndef STOQ_MAPS_H
#define STOQ_MAPS_H
#include "stoq_kern_user.h"

/* libxdp (xdp-loader -p DIR) pins maps marked by name under DIR. bpftool's loadall has
 * no pin root: for it build-bpf makes a second object with STOQ_NO_AUTOPIN, whose maps
 * carry no pinning attribute and are pinned into DIR by `pinmaps` instead (otherwise
 * libbpf would pin them at /sys/fs/bpf/<name>, shared across interfaces). */
#ifdef STOQ_NO_AUTOPIN
#define STOQ_PIN_BY_NAME
#else
#define STOQ_PIN_BY_NAME __uint(pinning, LIBBPF_PIN_BY_NAME);
#endif

/* The maps' layout version, STOQ_MAP_ABI_VERSION, as its entry count (read from the map's info;
 * its values are never used). */
struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, STOQ_MAP_ABI_VERSION);
  __type(key, __u32);
  __type(value, __u32);
  STOQ_PIN_BY_NAME
} stoq_abi SEC(".maps");

/* AF_XDP sockets, indexed by receive queue (or by worker when steering by CID). */
struct {
  __uint(type, BPF_MAP_TYPE_XSKMAP);
  __uint(max_entries, STOQ_MAX_SOCKETS);
  __type(key, __u32);
  __type(value, __u32);
  STOQ_PIN_BY_NAME
} xsk_map SEC(".maps");

/* The node's UDP ports (host order) → the address it listens on there (struct stoq_port). */
struct {
  __uint(type, BPF_MAP_TYPE_HASH);
  __uint(max_entries, STOQ_MAX_PORTS);
  __type(key, __u16);
  __type(value, struct stoq_port);
  STOQ_PIN_BY_NAME
} stoq_ports SEC(".maps");

/* One struct stoq_config: worker count and steering flags. */
struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, 1);
  __type(key, __u32);
  __type(value, struct stoq_config);
  STOQ_PIN_BY_NAME
} stoq_config SEC(".maps");

/* What each AF_XDP socket's worker has its Initials shed by (struct stoq_shed), by xsk_map
 * index; all zero: nothing. The worker writes its entry when a flood starts and ends. */
struct {
  __uint(type, BPF_MAP_TYPE_ARRAY);
  __uint(max_entries, STOQ_MAX_SOCKETS);
  __type(key, __u32);
  __type(value, struct stoq_shed);
  STOQ_PIN_BY_NAME
} stoq_shed SEC(".maps");

/* Per-CPU counters, one per enum stoq_stat. */
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, STOQ_STAT_MAX);
  __type(key, __u32);
  __type(value, __u64);
  STOQ_PIN_BY_NAME
} stoq_xdp_stats SEC(".maps");

#endif
