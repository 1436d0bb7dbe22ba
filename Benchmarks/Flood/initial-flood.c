/*
 * An Initial flood from one core, as a hostile Internet would send it: QUIC v1 Initials from
 * spoofed IPv6 sources, some of them real client Initials (a ClientHello the server can
 * decrypt, each with its own DCID: a handshake to start), the rest garbage shaped like an
 * Initial (long header, version 1, a random DCID the server must derive keys from before the
 * AEAD refuses it). scripts/bench-connections builds and runs it; nothing else links it.
 *
 * usage: initial-flood TARGET PORT PREFIX SECONDS RATE [INITIALS-FILE [VALID-PERCENT [IFNAME DSTMAC]]]
 *   TARGET   the server's IPv6 address; PORT its UDP port
 *   PREFIX   a /64 (e.g. fd00:5704::): every datagram's source is a random address in it
 *   SECONDS  how long to send; RATE datagrams a second (0: as fast as the core can)
 *   INITIALS real client Initials, each a 2-byte big-endian length and the datagram
 *   VALID-PERCENT  the share of datagrams taken from INITIALS (default 50)
 *   IFNAME DSTMAC  send whole Ethernet frames out of IFNAME to DSTMAC (the next hop's MAC)
 *            through AF_PACKET, bypassing the qdisc, as packet generators do (trafgen,
 *            pktgen): the sender then spends no UDP/IPv6 send path, routing or neighbour
 *            lookup per datagram. Without them: a UDP socket (sendmmsg).
 * Prints one JSON object: datagrams sent, valid among them, seconds, datagrams a second.
 *
 * A spoofed source needs IPV6_FREEBIND (root or CAP_NET_ADMIN) on the UDP socket: the kernel
 * then accepts any source in IPV6_PKTINFO and builds headers and checksums itself. AF_PACKET
 * needs CAP_NET_RAW; the flooder writes the headers and the UDP checksum itself.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_DGRAM 1500

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) { /* xorshift64*: speed, not secrecy */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dull;
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Real Initials, loaded whole. */
static uint8_t *valid_data;
static size_t *valid_off, *valid_len, nvalid;

static void load_initials(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "initial-flood: %s: %s\n", path, strerror(errno));
    exit(2);
  }
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  rewind(f);
  valid_data = malloc((size_t)size);
  if (!valid_data || fread(valid_data, 1, (size_t)size, f) != (size_t)size) {
    fprintf(stderr, "initial-flood: cannot read %s\n", path);
    exit(2);
  }
  fclose(f);
  size_t cap = (size_t)size / 1200 + 1;
  valid_off = malloc(cap * sizeof(size_t));
  valid_len = malloc(cap * sizeof(size_t));
  for (size_t at = 0; at + 2 <= (size_t)size && nvalid < cap;) {
    size_t len = (size_t)valid_data[at] << 8 | valid_data[at + 1];
    if (len == 0 || len > MAX_DGRAM || at + 2 + len > (size_t)size) {
      fprintf(stderr, "initial-flood: %s: bad record at byte %zu\n", path, at);
      exit(2);
    }
    valid_off[nvalid] = at + 2;
    valid_len[nvalid++] = len;
    at += 2 + len;
  }
}

/* Garbage shaped like a client's first Initial: 1200 bytes, long header, QUIC v1. */
static size_t garbage(uint8_t *p) {
  size_t n = 1200;
  for (size_t i = 0; i < n; i += 8) {
    uint64_t r = rnd();
    memcpy(p + i, &r, 8);
  }
  p[0] = 0xc0 | (p[0] & 0x0f);
  p[1] = 0, p[2] = 0, p[3] = 0, p[4] = 1;
  p[5] = 8 + (p[5] % 13); /* DCID length 8-20 */
  size_t o = 6 + p[5];
  p[o] = p[o] % 21; /* SCID length */
  o += 1 + p[o];
  p[o] = 0;               /* no token */
  p[o + 1] = 0x40 | 0x04; /* length 1100ish, as a 2-byte varint */
  p[o + 2] = 0x4c;
  return n;
}

/* AF_PACKET: the Ethernet, IPv6 and UDP headers in front of each datagram. */
#define FRAME_HDR (14 + 40 + 8)

static uint16_t udp6_checksum(const uint8_t *ip6, const uint8_t *udp, size_t udplen) {
  uint64_t sum = 0;
  for (int i = 8; i < 40; i += 2) sum += (uint32_t)ip6[i] << 8 | ip6[i + 1]; /* source, destination */
  sum += udplen + 17;
  for (size_t i = 0; i + 1 < udplen; i += 2) sum += (uint32_t)udp[i] << 8 | udp[i + 1];
  if (udplen & 1) sum += (uint32_t)udp[udplen - 1] << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  uint16_t c = (uint16_t)~sum;
  return c ? c : 0xffff;
}

/* Writes the headers of a datagram of `len` bytes at frame + FRAME_HDR. */
static void frame_headers(uint8_t *f, size_t len, const uint8_t *dmac, const uint8_t *smac, const struct in6_addr *src,
                          const struct in6_addr *dst, uint16_t sport, uint16_t dport) {
  memcpy(f, dmac, 6);
  memcpy(f + 6, smac, 6);
  f[12] = 0x86, f[13] = 0xdd;
  uint8_t *ip = f + 14, *udp = ip + 40;
  size_t ulen = 8 + len;
  memset(ip, 0, 8);
  ip[0] = 0x60;
  ip[4] = (uint8_t)(ulen >> 8), ip[5] = (uint8_t)ulen;
  ip[6] = 17, ip[7] = 64;
  memcpy(ip + 8, src, 16);
  memcpy(ip + 24, dst, 16);
  udp[0] = (uint8_t)(sport >> 8), udp[1] = (uint8_t)sport;
  udp[2] = (uint8_t)(dport >> 8), udp[3] = (uint8_t)dport;
  udp[4] = (uint8_t)(ulen >> 8), udp[5] = (uint8_t)ulen;
  udp[6] = udp[7] = 0;
  uint16_t c = udp6_checksum(ip, udp, ulen);
  udp[6] = (uint8_t)(c >> 8), udp[7] = (uint8_t)c;
}

static int open_packet_socket(const char *ifname, const char *dmac_text, uint8_t *dmac, uint8_t *smac) {
  unsigned m[6];
  if (sscanf(dmac_text, "%x:%x:%x:%x:%x:%x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 6) {
    fprintf(stderr, "initial-flood: DSTMAC %s is not aa:bb:cc:dd:ee:ff\n", dmac_text);
    exit(2);
  }
  for (int i = 0; i < 6; i++) dmac[i] = (uint8_t)m[i];
  int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: it receives nothing */
  struct ifreq ifr = {0};
  snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
  int one = 1;
  struct sockaddr_ll ll = {
      .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IPV6), .sll_ifindex = (int)if_nametoindex(ifname)};
  if (fd < 0 || ll.sll_ifindex == 0 || ioctl(fd, SIOCGIFHWADDR, &ifr) != 0 ||
      setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) != 0 ||
      bind(fd, (struct sockaddr *)&ll, sizeof(ll)) != 0) {
    fprintf(stderr, "initial-flood: AF_PACKET socket on %s: %s\n", ifname, strerror(errno));
    exit(1);
  }
  memcpy(smac, ifr.ifr_hwaddr.sa_data, 6);
  return fd;
}

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: initial-flood TARGET PORT PREFIX SECONDS RATE [INITIALS-FILE [VALID-PERCENT]]\n");
    return 2;
  }
  struct sockaddr_in6 dst = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)atoi(argv[2]))};
  struct in6_addr prefix;
  if (inet_pton(AF_INET6, argv[1], &dst.sin6_addr) != 1 || inet_pton(AF_INET6, argv[3], &prefix) != 1) {
    fprintf(stderr, "initial-flood: TARGET and PREFIX must be IPv6 addresses\n");
    return 2;
  }
  double seconds = atof(argv[4]), rate = atof(argv[5]);
  int valid_pct = argc > 7 ? atoi(argv[7]) : 50;
  if (argc > 6) load_initials(argv[6]);
  if (!nvalid) valid_pct = 0;
  rng_state ^= (uint64_t)getpid() << 17 ^ (uint64_t)time(NULL);

  int raw = argc > 9;
  uint8_t dmac[6], smac[6];
  int fd;
  if (raw) {
    fd = open_packet_socket(argv[8], argv[9], dmac, smac);
  } else {
    fd = socket(AF_INET6, SOCK_DGRAM, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, IPPROTO_IPV6, IPV6_FREEBIND, &one, sizeof(one)) != 0) {
      fprintf(stderr, "initial-flood: socket with IPV6_FREEBIND: %s\n", strerror(errno));
      return 1;
    }
  }

  static uint8_t bufs[BATCH][FRAME_HDR + MAX_DGRAM];
  static char ctl[BATCH][CMSG_SPACE(sizeof(struct in6_pktinfo))];
  struct mmsghdr msgs[BATCH];
  struct iovec iov[BATCH];
  uint64_t sent = 0, valid_sent = 0, next_valid = 0;
  double start = now_s(), end = start + seconds;
  while (now_s() < end) {
    if (rate > 0) { /* pace: never ahead of RATE */
      double due = start + (double)sent / rate;
      double t = now_s();
      if (due > t) {
        struct timespec d = {0, (long)((due - t) * 1e9)};
        nanosleep(&d, NULL);
      }
    }
    unsigned n = 0, nv = 0;
    for (; n < BATCH; n++) {
      size_t len;
      uint8_t *d = bufs[n] + (raw ? FRAME_HDR : 0);
      if ((int)(rnd() % 100) < valid_pct) {
        size_t k = next_valid++ % nvalid;
        len = valid_len[k];
        memcpy(d, valid_data + valid_off[k], len);
        nv++;
      } else {
        len = garbage(d);
      }
      struct in6_addr src = prefix;
      uint64_t host = rnd() | 0x1000; /* never ::0 .. ::fff, where the testbed's own hosts are */
      memcpy(&src.s6_addr[8], &host, 8);
      if (raw) {
        frame_headers(bufs[n], len, dmac, smac, &src, &dst.sin6_addr, (uint16_t)(1024 + rnd() % 60000),
                      ntohs(dst.sin6_port));
        iov[n] = (struct iovec){bufs[n], FRAME_HDR + len};
        msgs[n].msg_hdr = (struct msghdr){.msg_iov = &iov[n], .msg_iovlen = 1};
        continue;
      }
      iov[n] = (struct iovec){bufs[n], len};
      memset(ctl[n], 0, sizeof(ctl[n]));
      msgs[n].msg_hdr = (struct msghdr){.msg_name = &dst,
                                        .msg_namelen = sizeof(dst),
                                        .msg_iov = &iov[n],
                                        .msg_iovlen = 1,
                                        .msg_control = ctl[n],
                                        .msg_controllen = sizeof(ctl[n])};
      struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[n].msg_hdr);
      c->cmsg_level = IPPROTO_IPV6;
      c->cmsg_type = IPV6_PKTINFO;
      c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
      struct in6_pktinfo pi = {.ipi6_addr = src};
      memcpy(CMSG_DATA(c), &pi, sizeof(pi));
    }
    int k = sendmmsg(fd, msgs, n, 0);
    if (k < 0) {
      if (errno == ENOBUFS || errno == EAGAIN) continue;
      fprintf(stderr, "initial-flood: sendmmsg: %s\n", strerror(errno));
      return 1;
    }
    sent += (uint64_t)k;
    valid_sent += k == (int)n ? nv : 0;
  }
  double took = now_s() - start;
  printf("{\"sent\": %llu, \"valid\": %llu, \"seconds\": %.3f, \"per_second\": %.0f}\n", (unsigned long long)sent,
         (unsigned long long)valid_sent, took, (double)sent / took);
  return 0;
}
