/*
 * AF_XDP control plane: what the kernel says about an interface (its active queues, its
 * first global address, the XDP program attached and in which mode, the kernel version) and
 * the XDP program's per-CPU statistics map. Called at open and by `stoq xdp` / metrics, never
 * per packet.
 *
 * Why C: these are rtnetlink requests and libbpf calls (bpf_xdp_query, bpf_obj_get, per-CPU
 * map lookups) whose structs and LIBBPF_OPTS macros do not import into Swift; the stats names
 * come from bpf/stoq_kern_user.h, the header the XDP program itself is built with.
 */
#define _GNU_SOURCE
#include "stoq_xsk_internal.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <ifaddrs.h>
#include <linux/ethtool.h>
#include <linux/if_link.h>
#include <linux/sockios.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "stoq_kern_user.h"

/* The receive queues `ethtool -L` made active: the channels' rx + combined, which RSS spreads
 * over. An AF_XDP bind would take a queue id up to tx + combined when that is more (the kernel's
 * xsk_reg_pool_at_qid checks the larger of the two), but a socket there never receives, and
 * zero-copy drivers refuse it. -EOPNOTSUPP from a driver without get_channels. */
static int active_queues(const char *ifname) {
  int fd = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  struct ethtool_channels ch = {.cmd = ETHTOOL_GCHANNELS};
  struct ifreq ifr;
  memset(&ifr, 0, sizeof(ifr));
  snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
  ifr.ifr_data = (void *)&ch;
  int rc = ioctl(fd, SIOCETHTOOL, &ifr) == 0 ? 0 : -errno;
  close(fd);
  if (rc != 0) return rc;
  return (int)(ch.combined_count + ch.rx_count);
}

int stoq_xsk_interface_rx_queues(const char *ifname) {
  int ifindex = (int)if_nametoindex(ifname);
  if (ifindex == 0) return -ENODEV;
  /* The queues the device was allocated (IFLA_NUM_RX_QUEUES) can be more than the active ones
   * (ixgbe, or after `ethtool -L eth0 combined 8`): binding past those fails with EINVAL. */
  int active = active_queues(ifname);
  if (active > 0) return active;
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

int stoq_xdp_check_maps(const char *pin_dir, char *err, size_t errlen) {
  char path[256];
  const char *slash = strrchr(pin_dir, '/'), *iface = slash ? slash + 1 : pin_dir;
  snprintf(path, sizeof(path), "%s/%s", pin_dir, STOQ_MAP_ABI);
  unsigned version = 0; /* none: pinned by a build from before versions */
  int fd = bpf_obj_get(path);
  if (fd >= 0) {
    struct bpf_map_info info;
    uint32_t len = sizeof(info);
    memset(&info, 0, sizeof(info));
    int rc = bpf_obj_get_info_by_fd(fd, &info, &len) == 0 ? 0 : -errno;
    close(fd);
    if (rc != 0) {
      snprintf(err, errlen, "map ABI: %s: %s", path, strerror(-rc));
      return rc;
    }
    version = info.max_entries;
    if (version == STOQ_MAP_ABI_VERSION) return 0;
  } else if (errno != ENOENT) {
    int e = errno;
    snprintf(err, errlen, "map ABI: %s: %s", path, strerror(e));
    return -e;
  } else {
    char xsk[256];
    snprintf(xsk, sizeof(xsk), "%s/%s", pin_dir, STOQ_MAP_XSK);
    if (access(xsk, F_OK) != 0) {
      snprintf(err, errlen, "map ABI: %s: nothing pinned (attach with scripts/xdp-attach %s)", path, iface);
      return -ENOENT;
    }
  }
  char pinned[48];
  if (version) snprintf(pinned, sizeof(pinned), "%u", version);
  else snprintf(pinned, sizeof(pinned), "0 (missing: a build from before versions)");
  snprintf(
      err, errlen,
      "map ABI: %s: the pinned maps are layout version %s, this build's is %u: detach and attach with this "
      "build (scripts/xdp-attach --detach %s; scripts/xdp-attach %s --ports …), or run the build that attached them",
      path, pinned, STOQ_MAP_ABI_VERSION, iface, iface);
  return -EPROTO;
}

int stoq_xdp_read_stats(const char *pin_dir, uint64_t *out, int max) {
  char path[256];
  int abi = stoq_xdp_check_maps(pin_dir, path, sizeof(path));
  if (abi != 0) return abi;
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

int stoq_xdp_shed_initials(const char *pin_dir, uint32_t index, const struct stoq_shed_rule *rules, unsigned n,
                           unsigned shift, char *err, size_t errlen) {
  if (stoq_xdp_check_maps(pin_dir, err, errlen) != 0) return -1;
  char path[256];
  snprintf(path, sizeof(path), "%s/%s", pin_dir, STOQ_MAP_SHED);
  int fd = bpf_obj_get(path);
  if (fd < 0) {
    snprintf(err, errlen, "bpf_obj_get(%s): %s", path, strerror(errno));
    return -1;
  }
  struct stoq_shed plan;
  memset(&plan, 0, sizeof(plan));
  plan.count = n < STOQ_SHED_PREFIXES ? n : STOQ_SHED_PREFIXES;
  for (unsigned i = 0; i < plan.count; i++) plan.rules[i] = rules[i];
  plan.shift = shift;
  int rc = bpf_map_update_elem(fd, &index, &plan, BPF_ANY);
  if (rc != 0) snprintf(err, errlen, "bpf_map_update_elem(%s, %u): %s", path, index, strerror(errno));
  close(fd);
  return rc == 0 ? 0 : -1;
}

/* ---- open / close ---- */

int interface_address(const char *ifname, struct in6_addr *out) {
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

void query_mode(stoq_xsk *x) {
  LIBBPF_OPTS(bpf_xdp_query_opts, q);
  x->mode = "none";
  x->prog_id = 0;
  if (bpf_xdp_query(x->ifindex, 0, &q) != 0) return;
  switch (q.attach_mode) {
  case XDP_ATTACHED_DRV:
    x->mode = "native";
    x->prog_id = q.drv_prog_id;
    break;
  case XDP_ATTACHED_SKB:
    x->mode = "skb";
    x->prog_id = q.skb_prog_id;
    break;
  case XDP_ATTACHED_HW:
    x->mode = "hw";
    x->prog_id = q.hw_prog_id;
    break;
  case XDP_ATTACHED_MULTI:
    x->mode = "multi";
    x->prog_id = q.drv_prog_id ? q.drv_prog_id : q.skb_prog_id;
    break;
  default:
    break;
  }
}

int kernel_at_least(int major, int minor) {
  struct utsname u;
  int a = 0, b = 0;
  if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &a, &b) != 2) return 0;
  return a > major || (a == major && b >= minor);
}
