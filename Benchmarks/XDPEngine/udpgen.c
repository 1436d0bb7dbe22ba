/* Load generator for scripts/bench-xdp-engine: blasts fixed-size UDP datagrams at one
 * IPv6 address and port with sendmmsg for a fixed time, and prints how many it sent. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: udpgen <ipv6> <port> <seconds> <size>\n");
    return 2;
  }
  struct sockaddr_in6 to = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)atoi(argv[2]))};
  if (inet_pton(AF_INET6, argv[1], &to.sin6_addr) != 1) {
    fprintf(stderr, "udpgen: %s is not an IPv6 address\n", argv[1]);
    return 2;
  }
  double seconds = atof(argv[3]);
  size_t size = (size_t)atoi(argv[4]);
  int fd = socket(AF_INET6, SOCK_DGRAM, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0) {
    perror("udpgen: socket/connect");
    return 1;
  }
  int sndbuf = 8 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
  static unsigned char payload[BATCH][2048];
  struct mmsghdr msgs[BATCH];
  struct iovec iov[BATCH];
  memset(msgs, 0, sizeof(msgs));
  for (int i = 0; i < BATCH; i++) {
    memset(payload[i], 0x40 + i, size);
    payload[i][0] = 0x40; /* a QUIC short header: worker byte payload[1] */
    payload[i][1] = 0;
    iov[i].iov_base = payload[i];
    iov[i].iov_len = size;
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  unsigned long long sent = 0;
  for (;;) {
    int n = sendmmsg(fd, msgs, BATCH, 0);
    if (n > 0) sent += (unsigned)n;
    clock_gettime(CLOCK_MONOTONIC, &t);
    if ((double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9 >= seconds) break;
  }
  printf("%llu\n", sent);
  return 0;
}
