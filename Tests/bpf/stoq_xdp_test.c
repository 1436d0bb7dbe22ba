/*
 * Runs the real bpf/stoq_xdp.bpf.o through BPF_PROG_TEST_RUN on crafted frames and
 * checks each verdict and the counter that must have moved. No NIC needed.
 * Usage: stoq_xdp_test <stoq_xdp.bpf.o>
 */
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../bpf/stoq_kern_user.h"

static int prog_fd, stats_fd, config_fd, shed_fd, ports_fd;
static int passed, failed;
static const uint16_t PORT = 4433;

static uint64_t stat(enum stoq_stat s) {
  int ncpu = libbpf_num_possible_cpus();
  uint64_t vals[ncpu];
  uint32_t key = s;
  if (bpf_map_lookup_elem(stats_fd, &key, vals) != 0) return 0;
  uint64_t sum = 0;
  for (int i = 0; i < ncpu; i++) sum += vals[i];
  return sum;
}

static int run(const uint8_t *frame, size_t len) {
  uint8_t out[2048];
  LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = frame, .data_size_in = (uint32_t)len, .data_out = out,
              .data_size_out = sizeof(out), .repeat = 1);
  int rv = bpf_prog_test_run_opts(prog_fd, &opts);
  if (rv != 0) return -1000 + rv;
  return (int)opts.retval;
}

static void expect(const char *name, int ok) {
  printf("%s %s\n", ok ? "ok  " : "FAIL", name);
  if (ok) passed++;
  else failed++;
}

static void set_config(uint32_t workers, uint32_t flags) {
  struct stoq_config c = {.workers = workers, .flags = flags};
  uint32_t zero = 0;
  bpf_map_update_elem(config_fd, &zero, &c, BPF_ANY);
}

static void set_shed(uint32_t index, uint64_t prefix, uint32_t rule_shift, uint32_t count, uint32_t shift) {
  struct stoq_shed plan = {.count = count, .shift = shift};
  plan.rules[0] = (struct stoq_shed_rule){.prefix = prefix, .shift = rule_shift};
  bpf_map_update_elem(shed_fd, &index, &plan, BPF_ANY);
}

/* Registers PORT as the node's at `addr` ("::": every address), as stoq-node does. */
static void set_listen(const char *addr) {
  struct stoq_port owner;
  inet_pton(AF_INET6, addr, owner.addr);
  uint16_t port = PORT;
  bpf_map_update_elem(ports_fd, &port, &owner, BPF_ANY);
}

/* Ethernet + IPv6 (+ optional extension headers) + UDP + payload. */
static size_t ipv6_udp(uint8_t *f, uint16_t dport, const uint8_t *ext, size_t extlen, uint8_t first_next,
                       const uint8_t *payload, size_t plen) {
  memset(f, 0, 14 + 40);
  f[12] = 0x86;
  f[13] = 0xdd;
  uint8_t *ip = f + 14;
  ip[0] = 0x60;
  uint16_t pl = htons((uint16_t)(extlen + 8 + plen));
  memcpy(ip + 4, &pl, 2);
  ip[6] = extlen ? first_next : 17;
  ip[7] = 64;
  ip[8] = 0xfd;
  ip[23] = 2;
  ip[24] = 0xfd;
  ip[39] = 1;
  memcpy(ip + 40, ext, extlen);
  uint8_t *udp = ip + 40 + extlen;
  uint16_t sp = htons(50000), dp = htons(dport), ul = htons((uint16_t)(8 + plen));
  memcpy(udp, &sp, 2);
  memcpy(udp + 2, &dp, 2);
  memcpy(udp + 4, &ul, 2);
  udp[6] = udp[7] = 0;
  memcpy(udp + 8, payload, plen);
  return 14 + 40 + extlen + 8 + plen;
}

static size_t short_header(uint8_t *p, uint8_t worker) {
  memset(p, 0xab, 40);
  p[0] = 0x40;
  p[1] = worker;
  return 40;
}

static size_t long_header(uint8_t *p, uint8_t worker) {
  memset(p, 0, 1200);
  p[0] = 0xc0;
  p[4] = 1;
  p[5] = 8;
  p[6] = worker;
  return 1200;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s stoq_xdp.bpf.o\n", argv[0]);
    return 2;
  }
  struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
  if (!obj) {
    fprintf(stderr, "cannot open %s\n", argv[1]);
    return 1;
  }
  /* The maps pin by name when an operator attaches; a test run must not touch bpffs. */
  struct bpf_map *m;
  bpf_object__for_each_map(m, obj) bpf_map__set_pin_path(m, NULL);
  if (bpf_object__load(obj) != 0) {
    fprintf(stderr, "cannot load %s\n", argv[1]);
    return 1;
  }
  prog_fd = bpf_program__fd(bpf_object__find_program_by_name(obj, "stoq_xdp"));
  stats_fd = bpf_map__fd(bpf_object__find_map_by_name(obj, STOQ_MAP_STATS));
  config_fd = bpf_map__fd(bpf_object__find_map_by_name(obj, STOQ_MAP_CONFIG));
  shed_fd = bpf_map__fd(bpf_object__find_map_by_name(obj, STOQ_MAP_SHED));
  ports_fd = bpf_map__fd(bpf_object__find_map_by_name(obj, STOQ_MAP_PORTS));
  set_listen("::"); /* as scripts/xdp-attach --ports leaves it */

  uint8_t f[2048], p[1500];
  char name[128];

  /* Steering by CID: worker = first DCID byte % workers. */
  set_config(2, STOQ_F_STEER_BY_CID);
  uint8_t workers[] = {0, 1, 3, 4};
  for (int lh = 0; lh < 2; lh++) {
    for (unsigned i = 0; i < sizeof(workers); i++) {
      size_t pl = lh ? long_header(p, workers[i]) : short_header(p, workers[i]);
      size_t n = ipv6_udp(f, PORT, NULL, 0, 0, p, pl);
      uint32_t w = workers[i] % 2;
      uint64_t before = stat(STOQ_STAT_WORKER_0 + w), nosock = stat(STOQ_STAT_PASSED_NO_SOCKET);
      int v = run(f, n);
      snprintf(name, sizeof(name), "%s header, DCID byte %u -> worker %u (no socket bound: XDP_PASS, counted)",
               lh ? "long" : "short", workers[i], w);
      expect(name, v == XDP_PASS && stat(STOQ_STAT_WORKER_0 + w) == before + 1 &&
                       stat(STOQ_STAT_PASSED_NO_SOCKET) == nosock + 1);
    }
  }

  /* Steering by receive queue (test runs arrive on queue 0). */
  set_config(0, 0);
  {
    size_t n = ipv6_udp(f, PORT, NULL, 0, 0, p, short_header(p, 7));
    uint64_t before = stat(STOQ_STAT_WORKER_0), cid = stat(STOQ_STAT_STEERED_BY_CID);
    int v = run(f, n);
    expect("queue steering: DCID ignored, queue 0",
           v == XDP_PASS && stat(STOQ_STAT_WORKER_0) == before + 1 && stat(STOQ_STAT_STEERED_BY_CID) == cid);
  }
  set_config(2, STOQ_F_STEER_BY_CID);

  /* IPv4 UDP to the node's port: passed (another service may use IPv4 on it), counted. */
  {
    memset(f, 0, 64);
    f[12] = 0x08;
    f[13] = 0x00;
    f[14] = 0x45;
    f[14 + 9] = 17;
    uint16_t dp = htons(PORT);
    memcpy(f + 14 + 20 + 2, &dp, 2);
    uint64_t before = stat(STOQ_STAT_PASSED_IPV4);
    expect("IPv4 UDP to the node port -> XDP_PASS, counted",
           run(f, 14 + 20 + 8 + 16) == XDP_PASS && stat(STOQ_STAT_PASSED_IPV4) == before + 1);
    dp = htons(53);
    memcpy(f + 14 + 20 + 2, &dp, 2);
    expect("IPv4 UDP to another port -> XDP_PASS", run(f, 14 + 20 + 8 + 16) == XDP_PASS);
  }

  /* Other traffic passes untouched. */
  {
    size_t n = ipv6_udp(f, PORT, NULL, 0, 0, p, 8);
    f[14 + 6] = 58; /* ICMPv6 (neighbour discovery) */
    uint64_t before = stat(STOQ_STAT_PASSED_NOT_UDP);
    expect("ICMPv6 / ND -> XDP_PASS", run(f, n) == XDP_PASS && stat(STOQ_STAT_PASSED_NOT_UDP) == before + 1);
    f[14 + 6] = 6; /* TCP, e.g. SSH */
    expect("TCP -> XDP_PASS", run(f, n) == XDP_PASS && stat(STOQ_STAT_PASSED_NOT_UDP) == before + 2);
    n = ipv6_udp(f, 5353, NULL, 0, 0, p, short_header(p, 0));
    before = stat(STOQ_STAT_PASSED_OTHER_PORT);
    expect("UDP to another port -> XDP_PASS", run(f, n) == XDP_PASS && stat(STOQ_STAT_PASSED_OTHER_PORT) == before + 1);
    memset(f, 0, 64);
    f[12] = 0x08;
    f[13] = 0x06; /* ARP */
    expect("ARP -> XDP_PASS", run(f, 60) == XDP_PASS);
  }

  /* The node's address: a node on one address gets the port there only; on [::], at any. */
  {
    set_config(0, 0);
    size_t n = ipv6_udp(f, PORT, NULL, 0, 0, p, short_header(p, 0)); /* to fd00::1 */
    set_listen("fd00::1");
    uint64_t before = stat(STOQ_STAT_WORKER_0), other = stat(STOQ_STAT_PASSED_OTHER_ADDRESS);
    expect("listening on fd00::1: the port at fd00::1 -> steered", run(f, n) == XDP_PASS &&
                                                                       stat(STOQ_STAT_WORKER_0) == before + 1 &&
                                                                       stat(STOQ_STAT_PASSED_OTHER_ADDRESS) == other);
    set_listen("fd00::3");
    before = stat(STOQ_STAT_WORKER_0);
    expect("listening on fd00::3: the port at fd00::1 -> XDP_PASS, counted as passed_other_address",
           run(f, n) == XDP_PASS && stat(STOQ_STAT_PASSED_OTHER_ADDRESS) == other + 1 &&
               stat(STOQ_STAT_WORKER_0) == before);
    f[14 + 24 + 15] = 3; /* now to fd00::3 */
    expect("listening on fd00::3: the port at fd00::3 -> steered",
           run(f, n) == XDP_PASS && stat(STOQ_STAT_WORKER_0) == before + 1 &&
               stat(STOQ_STAT_PASSED_OTHER_ADDRESS) == other + 1);
    f[14 + 24] = 0x20; /* 2000::3: another address on the same port */
    expect("listening on fd00::3: the port at 2000::3 -> XDP_PASS, counted",
           run(f, n) == XDP_PASS && stat(STOQ_STAT_PASSED_OTHER_ADDRESS) == other + 2);
    set_listen("::");
    expect("listening on [::]: the port at 2000::3 -> steered", run(f, n) == XDP_PASS &&
                                                                    stat(STOQ_STAT_WORKER_0) == before + 2 &&
                                                                    stat(STOQ_STAT_PASSED_OTHER_ADDRESS) == other + 2);
    set_config(2, STOQ_F_STEER_BY_CID);
  }

  /* Extension headers: within the bound they are walked; beyond it the frame passes. */
  {
    uint8_t ext[8 * 8];
    for (int k = 0; k < 3; k++) {
      ext[k * 8] = k == 2 ? 17 : 60;
      ext[k * 8 + 1] = 0;
      memset(ext + k * 8 + 2, 1, 6);
    }
    size_t n = ipv6_udp(f, PORT, ext, 24, 0 /* hop-by-hop */, p, short_header(p, 1));
    uint64_t before = stat(STOQ_STAT_WORKER_0 + 1);
    expect("hop-by-hop + 2 destination options + UDP -> steered",
           run(f, n) == XDP_PASS && stat(STOQ_STAT_WORKER_0 + 1) == before + 1);
    for (int k = 0; k < 8; k++) {
      ext[k * 8] = k == 7 ? 17 : 60;
      ext[k * 8 + 1] = 0;
    }
    n = ipv6_udp(f, PORT, ext, 64, 60, p, short_header(p, 1));
    before = stat(STOQ_STAT_PASSED_EXT_LIMIT);
    expect("8 extension headers (bound is 6) -> XDP_PASS, counted",
           run(f, n) == XDP_PASS && stat(STOQ_STAT_PASSED_EXT_LIMIT) == before + 1);
    uint8_t frag[8] = {17, 0, 0x00, 0x08, 1, 2, 3, 4}; /* offset 1 (x8): not the first fragment */
    n = ipv6_udp(f, PORT, frag, 8, 44, p, short_header(p, 1));
    before = stat(STOQ_STAT_PASSED_FRAGMENT);
    expect("non-first fragment -> XDP_PASS, counted",
           run(f, n) == XDP_PASS && stat(STOQ_STAT_PASSED_FRAGMENT) == before + 1);
    uint8_t frag0[8] = {17, 0, 0x00, 0x01, 1, 2, 3, 4}; /* first fragment, more follow */
    n = ipv6_udp(f, PORT, frag0, 8, 44, p, short_header(p, 0));
    before = stat(STOQ_STAT_WORKER_0);
    expect("first fragment -> parsed and steered", run(f, n) == XDP_PASS && stat(STOQ_STAT_WORKER_0) == before + 1);
  }

  /* Truncated at every length: never a crash, never a redirect, always a verdict. */
  {
    size_t full = ipv6_udp(f, PORT, NULL, 0, 0, p, long_header(p, 1));
    int bad = 0;
    for (size_t len = 14; len <= 14 + 40 + 8 + 8; len++) {
      int v = run(f, len);
      if (v != XDP_PASS) bad++;
    }
    snprintf(name, sizeof(name), "truncated IPv6/UDP/QUIC frames at every length 14..%d -> XDP_PASS", 14 + 40 + 8 + 8);
    expect(name, bad == 0 && stat(STOQ_STAT_PASSED_TRUNCATED) > 0);
    expect("the full frame still steers", run(f, full) == XDP_PASS);
  }

  /* Shedding: v1 Initials without a token, by the plan of the socket they are steered to. */
  {
    set_config(2, STOQ_F_STEER_BY_CID);
    uint64_t source = 0xfd00000000000000ull; /* ipv6_udp's source, fd00::2, is in fd00::/64 */
    /* An Initial for worker 1 (DCID byte 1) without a token, one with a token, a Handshake. */
    size_t pl = long_header(p, 1);
    p[0] = 0xc3;
    size_t initial = ipv6_udp(f, PORT, NULL, 0, 0, p, pl);
    uint8_t tokened[2048], handshake[2048];
    memcpy(tokened, f, initial);
    tokened[14 + 40 + 8 + 7 + 8] = 4; /* token length 4 after the 8-byte DCID and empty SCID */
    memcpy(handshake, f, initial);
    handshake[14 + 40 + 8] = 0xe3;
    int dropped = 0, passed_other = 0;
    uint64_t shed0 = stat(STOQ_STAT_SHED_INITIAL);
    set_shed(1, source, 16, 1, 0); /* this /64 keeps one in 65536; the others all */
    for (int i = 0; i < 64; i++) dropped += run(f, initial) == XDP_DROP;
    for (int i = 0; i < 64; i++)
      passed_other += run(tokened, initial) == XDP_PASS && run(handshake, initial) == XDP_PASS;
    snprintf(name, sizeof(name), "shedding: %d of 64 tokenless Initials from the rule's /64 dropped, counted", dropped);
    expect(name, dropped >= 60 && stat(STOQ_STAT_SHED_INITIAL) == shed0 + (uint64_t)dropped);
    expect("shedding: Initials with a token and Handshakes pass", passed_other == 64);
    f[14 + 8 + 7] = 3; /* another /64 */
    int kept = 0;
    for (int i = 0; i < 64; i++) kept += run(f, initial) == XDP_PASS;
    expect("shedding: another /64 with the plan's shift 0 keeps all", kept == 64);
    set_shed(1, source, 16, 1, 16);
    dropped = 0;
    for (int i = 0; i < 64; i++) dropped += run(f, initial) == XDP_DROP;
    expect("shedding: the plan's own shift sheds everyone else", dropped >= 60);
    p[6] = 0;
    size_t other_worker = ipv6_udp(f, PORT, NULL, 0, 0, p, pl);
    kept = 0;
    for (int i = 0; i < 64; i++) kept += run(f, other_worker) == XDP_PASS;
    expect("shedding: a worker without a plan (worker 0) keeps all", kept == 64);
    /* The verdict agrees with stoq_quic_sheddable_initial at every length from the worker
     * byte (shorter ones are not steered, so never shed) through the token length. */
    set_shed(1, 0, 0, 0, 32);
    ipv6_udp(f, PORT, NULL, 0, 0, p, long_header(p, 1));
    int disagree = 0, checked = 0;
    for (size_t len = 14 + 40 + 8 + STOQ_QUIC_LONG_WORKER_OFFSET + 1; len <= 14 + 40 + 8 + 24; len++) {
      for (int token = 0; token < 3; token++) {
        f[14 + 40 + 8 + 7 + 8] = (uint8_t)token;
        uint8_t *q = f + 14 + 40 + 8;
        int want = stoq_quic_sheddable_initial(q, f + len) ? XDP_DROP : XDP_PASS;
        /* one kept in 2^32: a sheddable one is dropped unless the draw is 0 */
        disagree += run(f, len) != want;
        checked++;
      }
    }
    snprintf(name, sizeof(name), "shedding: XDP and stoq_quic_sheddable_initial agree on %d truncations", checked);
    expect(name, disagree == 0);
    set_shed(1, 0, 0, 0, 0);
  }

  printf("bpf: %d passed, %d failed\n", passed, failed);
  bpf_object__close(obj);
  return failed ? 1 : 0;
}
