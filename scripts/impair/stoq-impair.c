// stoq-impair: a user-space link impairer on NFQUEUE, for the mesh testbed (scripts/mesh).
//
// Why it exists: this kernel has no netem, so delay, loss, corruption and reordering are done
// here. An ip6tables rule sends a link's outgoing datagrams to an NFQUEUE; this program holds
// each one until its release time (delay plus jitter, which reorders), drops a share at random
// (loss), or flips a byte of its UDP payload and fixes the checksum (corruption, so the
// datagram reaches QUIC and fails its integrity check there, as a corrupted one does on the
// Internet). Rate is not done here: tbf on the veth does it in the kernel.
//
// Why C: it handles every datagram of a link at up to a few hundred thousand per second. It
// asks for metadata only (no payload copy) unless corruption is on, keeps held datagrams in a
// preallocated binary heap keyed by release time, and never allocates per datagram.
//
// The kernel segments GSO batches before queueing them (NFQA_CFG_F_GSO is not set), so loss
// and delay apply per datagram, as on a real link.
//
// Deterministic for a given --seed and arrival order. Stops on SIGTERM/SIGINT, releasing what
// it holds. Prints its counters on exit and on SIGUSR1 (one JSON line to stderr).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/netfilter.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libnetfilter_queue/libnetfilter_queue.h>
#include <linux/netfilter/nfnetlink_queue.h>

enum { HEAP_CAP = 1 << 17, BUF_SIZE = 1 << 17 };

typedef struct {
    uint64_t due_ns;
    uint64_t seq;  // arrival order: equal release times leave in arrival order
    uint32_t id;
} held;

static struct {
    held heap[HEAP_CAP];
    size_t n;
    uint64_t seq;
    struct nfq_q_handle *qh;
    uint64_t delay_ns, jitter_ns;
    uint32_t loss_ppm, corrupt_ppm;
    uint64_t rng;
    uint64_t seen, passed, dropped, corrupted, overflow;
    uint64_t drop_list[64];  // --drop: these datagrams (1 = the first seen) are dropped
    size_t drop_n;
} S;

static volatile sig_atomic_t stop_requested, stats_requested;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

// SplitMix64: small, fast, and the same sequence for the same seed.
static uint64_t rnd(void) {
    uint64_t z = (S.rng += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}
static int chance(uint32_t ppm) { return ppm > 0 && rnd() % 1000000u < ppm; }

static int earlier(const held *a, const held *b) {
    return a->due_ns < b->due_ns || (a->due_ns == b->due_ns && a->seq < b->seq);
}
static void heap_push(held h) {
    size_t i = S.n++;
    S.heap[i] = h;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!earlier(&S.heap[i], &S.heap[p])) break;
        held t = S.heap[p]; S.heap[p] = S.heap[i]; S.heap[i] = t;
        i = p;
    }
}
static held heap_pop(void) {
    held top = S.heap[0];
    S.heap[0] = S.heap[--S.n];
    for (size_t i = 0;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < S.n && earlier(&S.heap[l], &S.heap[m])) m = l;
        if (r < S.n && earlier(&S.heap[r], &S.heap[m])) m = r;
        if (m == i) break;
        held t = S.heap[m]; S.heap[m] = S.heap[i]; S.heap[i] = t;
        i = m;
    }
    return top;
}

static void release_due(uint64_t now) {
    while (S.n > 0 && S.heap[0].due_ns <= now) {
        held h = heap_pop();
        nfq_set_verdict(S.qh, h.id, NF_ACCEPT, 0, NULL);
        S.passed++;
    }
}

// Flips one byte of the UDP payload of an IPv6 datagram (UDP right after the fixed header,
// as every datagram here is) and recomputes the UDP checksum. Returns 1 when it did.
// (libnetfilter_queue's nfq_ip6_set_transport_header is not used: in Debian 12's 1.0.5 it
// spins forever on some datagrams, which froze the link in the first corruption runs.)
static int corrupt(uint8_t *data, int len, uint32_t id) {
    if (len < 40 + 8 + 1 || (data[0] >> 4) != 6 || data[6] != IPPROTO_UDP) return 0;
    uint8_t *udp = data + 40;
    unsigned ulen = (unsigned)udp[4] << 8 | udp[5];
    if (ulen < 9 || 40 + ulen > (unsigned)len) return 0;
    udp[8 + rnd() % (ulen - 8)] ^= (uint8_t)(1u + rnd() % 255u);
    udp[6] = udp[7] = 0;
    // RFC 8200 §8.1: the pseudo-header (source, destination, length, next header) and the datagram.
    uint32_t sum = ulen + IPPROTO_UDP;
    for (int i = 8; i < 40; i += 2) sum += (uint32_t)data[i] << 8 | data[i + 1];
    for (unsigned i = 0; i + 1 < ulen; i += 2) sum += (uint32_t)udp[i] << 8 | udp[i + 1];
    if (ulen & 1) sum += (uint32_t)udp[ulen - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    uint16_t check = (uint16_t)~sum;
    if (check == 0) check = 0xffff;
    udp[6] = (uint8_t)(check >> 8);
    udp[7] = (uint8_t)check;
    nfq_set_verdict(S.qh, id, NF_ACCEPT, (uint32_t)len, data);
    return 1;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *arg) {
    (void)msg; (void)arg;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph) return 0;
    uint32_t id = ntohl(ph->packet_id);
    S.seen++;
    bool listed = false;
    for (size_t i = 0; i < S.drop_n; i++) listed |= S.drop_list[i] == S.seen;
    if (listed || chance(S.loss_ppm)) {
        nfq_set_verdict(qh, id, NF_DROP, 0, NULL);
        S.dropped++;
        return 0;
    }
    if (chance(S.corrupt_ppm)) {
        uint8_t *data = NULL;
        int len = nfq_get_payload(nfa, &data);
        if (len > 0 && corrupt(data, len, id)) { S.corrupted++; S.passed++; return 0; }
    }
    uint64_t delay = S.delay_ns;
    if (S.jitter_ns > 0) delay += rnd() % (S.jitter_ns + 1);
    if (delay == 0) {
        nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
        S.passed++;
        return 0;
    }
    if (S.n == HEAP_CAP) {  // a full link queue drops, as a router's would
        nfq_set_verdict(qh, id, NF_DROP, 0, NULL);
        S.overflow++;
        return 0;
    }
    heap_push((held){.due_ns = now_ns() + delay, .seq = S.seq++, .id = id});
    return 0;
}

static void print_stats(const char *when) {
    fprintf(stderr,
            "{\"event\":\"%s\",\"seen\":%" PRIu64 ",\"passed\":%" PRIu64 ",\"dropped\":%" PRIu64
            ",\"corrupted\":%" PRIu64 ",\"overflow\":%" PRIu64 ",\"held\":%zu}\n",
            when, S.seen, S.passed, S.dropped, S.corrupted, S.overflow, S.n);
}

static void on_signal(int sig) {
    if (sig == SIGUSR1) stats_requested = 1; else stop_requested = 1;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: stoq-impair --queue N [--delay-ms D] [--jitter-ms J] [--loss PCT] [--corrupt PCT] [--seed S]\n"
            "                   [--drop K,L,...]\n"
            "  holds each datagram of NFQUEUE N for D ms (+ uniform 0..J ms, which reorders),\n"
            "  drops PCT %% of them, corrupts PCT %% of the UDP payloads (checksum fixed);\n"
            "  --drop drops the K-th, L-th, ... datagram it sees (1 = the first; at most 64)\n");
}

static int parse_pct(const char *s, const char *name, uint32_t *ppm) {
    char *end;
    double v = strtod(s, &end);
    if (*s == 0 || *end != 0 || v < 0 || v > 100) {
        fprintf(stderr, "stoq-impair: %s must be a percentage from 0 to 100, not '%s'\n", name, s);
        return -1;
    }
    *ppm = (uint32_t)(v * 10000.0 + 0.5);
    return 0;
}
static int parse_drop_list(const char *s) {
    for (const char *p = s; *p;) {
        char *end;
        unsigned long long v = strtoull(p, &end, 10);
        if (end == p || v == 0 || S.drop_n == 64 || (*end != ',' && *end != 0)) {
            fprintf(stderr, "stoq-impair: --drop must be up to 64 datagram numbers from 1, like 2,3,4, not '%s'\n", s);
            return -1;
        }
        S.drop_list[S.drop_n++] = v;
        p = *end ? end + 1 : end;
    }
    return 0;
}
static int parse_ms(const char *s, const char *name, uint64_t *ns) {
    char *end;
    double v = strtod(s, &end);
    if (*s == 0 || *end != 0 || v < 0 || v > 60000) {
        fprintf(stderr, "stoq-impair: %s must be milliseconds from 0 to 60000, not '%s'\n", name, s);
        return -1;
    }
    *ns = (uint64_t)(v * 1e6 + 0.5);
    return 0;
}

int main(int argc, char **argv) {
    int queue = -1;
    S.rng = 1;
    static const struct option opts[] = {
        {"queue", required_argument, 0, 'q'}, {"delay-ms", required_argument, 0, 'd'},
        {"jitter-ms", required_argument, 0, 'j'}, {"loss", required_argument, 0, 'l'},
        {"corrupt", required_argument, 0, 'c'}, {"seed", required_argument, 0, 's'},
        {"drop", required_argument, 0, 'x'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (o) {
        case 'q': queue = atoi(optarg); break;
        case 'd': if (parse_ms(optarg, "--delay-ms", &S.delay_ns)) return 2; break;
        case 'j': if (parse_ms(optarg, "--jitter-ms", &S.jitter_ns)) return 2; break;
        case 'l': if (parse_pct(optarg, "--loss", &S.loss_ppm)) return 2; break;
        case 'c': if (parse_pct(optarg, "--corrupt", &S.corrupt_ppm)) return 2; break;
        case 's': S.rng = strtoull(optarg, NULL, 0); break;
        case 'x': if (parse_drop_list(optarg)) return 2; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (queue < 0 || queue > 65535) { usage(stderr); return 2; }

    struct nfq_handle *h = nfq_open();
    if (!h) { perror("stoq-impair: nfq_open"); return 1; }
    S.qh = nfq_create_queue(h, (uint16_t)queue, on_packet, NULL);
    if (!S.qh) { fprintf(stderr, "stoq-impair: cannot bind NFQUEUE %d (another impairer on it?)\n", queue); return 1; }
    int copy = S.corrupt_ppm > 0 ? NFQNL_COPY_PACKET : NFQNL_COPY_META;
    if (nfq_set_mode(S.qh, (uint8_t)copy, 0xffff) < 0) { perror("stoq-impair: nfq_set_mode"); return 1; }
    nfq_set_queue_maxlen(S.qh, HEAP_CAP);
    int fd = nfq_fd(h);
    int rcvbuf = 64 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);

    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);

    static char buf[BUF_SIZE] __attribute__((aligned(8)));
    fprintf(stderr, "stoq-impair: queue %d delay %.3f ms jitter %.3f ms loss %.4f %% corrupt %.4f %%\n", queue,
            S.delay_ns / 1e6, S.jitter_ns / 1e6, S.loss_ppm / 1e4, S.corrupt_ppm / 1e4);
    while (!stop_requested) {
        if (stats_requested) { stats_requested = 0; print_stats("stats"); }
        uint64_t now = now_ns();
        release_due(now);
        struct timespec ts, *timeout = NULL;
        if (S.n > 0) {
            uint64_t wait = S.heap[0].due_ns > now ? S.heap[0].due_ns - now : 0;
            ts = (struct timespec){.tv_sec = (time_t)(wait / 1000000000u), .tv_nsec = (long)(wait % 1000000000u)};
            timeout = &ts;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = ppoll(&p, 1, timeout, NULL);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("stoq-impair: poll");
            break;
        }
        // Drain what is queued without blocking, then release what became due.
        for (;;) {
            ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (n < 0) {
                if (errno == ENOBUFS) { S.overflow++; continue; }  // the kernel dropped some: count, go on
                break;
            }
            nfq_handle_packet(h, buf, (int)n);
        }
    }
    release_due(UINT64_MAX);
    print_stats("exit");
    nfq_destroy_queue(S.qh);
    nfq_close(h);
    return 0;
}
