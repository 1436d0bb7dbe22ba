/*
 * qlog: ngtcp2 0.12 writes each sampled connection's qlog itself (JSON-SEQ, RFC 7464: every
 * record starts with 0x1E and ends with a newline; a header record, then one per event);
 * this file only decides which connections are sampled and gets the bytes to a file named
 * after the connection's original destination CID and our role, `<odcid-hex>.<role>.sqlog`.
 *
 * Why here and buffered: ngtcp2 calls the write callback once per event — several per
 * packet — on the worker's thread. Each sampled connection gathers them in one buffer
 * allocated when it is made, and writes the buffer with one write(2) when it is full, and
 * when the endpoint lets the connection go (stoq_conn_qlog_close) or ngtcp2 ends the log
 * (NGTCP2_QLOG_WRITE_FLAG_FIN, from ngtcp2_conn_del), whichever comes first: the file and
 * the buffer go then. A connection that is not sampled costs nothing: ngtcp2 gets no callback
 * and formats no event. The file is opened when the connection is made, so a failure to
 * create it is known at once and counted; the connection then runs without qlog.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Events gathered before one write(2). A busy transfer logs some 300-600 bytes per packet,
   so this is one syscall per ~150 packets; the cost in memory is per sampled connection. */
#define QLOG_BUFFER (64u << 10)

struct stoq_qlog {
  int fd;
  size_t len;
  uint8_t buf[QLOG_BUFFER];
};

int stoq_endpoint_ctx_set_qlog(stoq_endpoint_ctx *ep, const char *dir, double sample, unsigned max_open) {
  ep->qlog_max_open = max_open;
  if (!dir || !*dir || !(sample > 0)) {
    if (ep->qlog_dirfd >= 0) close(ep->qlog_dirfd);
    ep->qlog_dirfd = -1;
    ep->qlog_threshold = 0;
    return 0;
  }
  int fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  /* O_PATH checks no permission: ask now, so a directory we cannot write is refused here and
     not found out one connection at a time. */
  if (access(dir, W_OK | X_OK) != 0) {
    int e = errno;
    close(fd);
    return e;
  }
  if (ep->qlog_dirfd >= 0) close(ep->qlog_dirfd);
  ep->qlog_dirfd = fd;
  ep->qlog_threshold = sample >= 1 ? (UINT64_C(1) << 32) : (uint64_t)(sample * 4294967296.0);
  return 0;
}

void stoq_endpoint_ctx_qlog_stats(const stoq_endpoint_ctx *ep, stoq_qlog_stats *out) { *out = ep->qlog_stats; }

static int sampled(stoq_endpoint_ctx *ep) {
  if (ep->qlog_dirfd < 0 || ep->qlog_threshold == 0) return 0;
  if (ep->qlog_threshold < (UINT64_C(1) << 32)) {
    uint32_t r;
    if (gnutls_rnd(GNUTLS_RND_NONCE, &r, sizeof(r)) != 0 || r >= ep->qlog_threshold) return 0;
  }
  if (ep->qlog_open >= ep->qlog_max_open) {
    ep->qlog_stats.skipped++;
    return 0;
  }
  return 1;
}

static void qlog_flush(stoq_conn *c) {
  struct stoq_qlog *q = c->qlog;
  size_t off = 0;
  while (off < q->len && q->fd >= 0) {
    ssize_t n = write(q->fd, q->buf + off, q->len - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      /* A full disk must not stop the connection: its qlog ends here, counted. */
      c->ep->qlog_stats.errors++;
      close(q->fd);
      q->fd = -1;
      break;
    }
    off += (size_t)n;
    c->ep->qlog_stats.bytes += (uint64_t)n;
  }
  q->len = 0;
}

static void qlog_close(stoq_conn *c) {
  struct stoq_qlog *q = c->qlog;
  qlog_flush(c);
  if (q->fd >= 0) close(q->fd);
  q->fd = -1;
}

/* ngtcp2's ngtcp2_qlog_write; `ud` is the connection's user data (the stoq_conn). */
static void cb_qlog_write(void *ud, uint32_t flags, const void *data, size_t len) {
  stoq_conn *c = ud;
  struct stoq_qlog *q = c->qlog;
  if (!q || q->fd < 0) return;
  if (len) {
    if (q->len + len > QLOG_BUFFER) qlog_flush(c);
    if (len <= QLOG_BUFFER) {
      memcpy(q->buf + q->len, data, len);
      q->len += len;
    }
  }
  if (flags & NGTCP2_QLOG_WRITE_FLAG_FIN) qlog_close(c);
}

void qlog_attach(stoq_conn *c, ngtcp2_settings *st, const ngtcp2_cid *odcid) {
  stoq_endpoint_ctx *ep = c->ep;
  if (!sampled(ep)) return;
  char name[2 * NGTCP2_MAX_CIDLEN + sizeof(".server.sqlog")];
  static const char hex[] = "0123456789abcdef";
  size_t n = 0;
  for (size_t i = 0; i < odcid->datalen; i++) {
    name[n++] = hex[odcid->data[i] >> 4];
    name[n++] = hex[odcid->data[i] & 15];
  }
  strcpy(name + n, c->is_server ? ".server.sqlog" : ".client.sqlog");
  struct stoq_qlog *q = malloc(sizeof(*q));
  if (!q) {
    ep->qlog_stats.errors++;
    return;
  }
  /* O_APPEND: a client that reuses an ODCID (or a Retry) adds a second trace, never
     interleaved bytes. */
  q->fd = openat(ep->qlog_dirfd, name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (q->fd < 0) {
    ep->qlog_stats.errors++;
    free(q);
    return;
  }
  q->len = 0;
  c->qlog = q;
  ep->qlog_open++;
  ep->qlog_stats.connections++;
  st->qlog.odcid = *odcid;
  st->qlog.write = cb_qlog_write;
}

void stoq_conn_qlog_close(stoq_conn *c) { qlog_free(c); }

/* After this ngtcp2 may still call the writer (the FIN from ngtcp2_conn_del): with no qlog
   left it does nothing. */
void qlog_free(stoq_conn *c) {
  if (!c->qlog) return;
  qlog_close(c);
  free(c->qlog);
  c->qlog = NULL;
  c->ep->qlog_open--;
}
