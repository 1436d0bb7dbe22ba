/*
 * Body sinks: where the body a peer sends goes — staged, then written to the caller's file
 * descriptor in large pwrites at the caller's offset, SHA-256 kept on the way.
 *
 * Why C: every received body byte passes here, once per STREAM frame; staging and hashing in
 * C keeps the per-packet path free of Swift calls and allocations.
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* How much received body is gathered before one pwrite. */
#define SINK_BUFFER (256u << 10)

static void sink_write(stoq_stream *s, const uint8_t *data, size_t len, uint64_t at) {
  size_t off = 0;
  while (off < len && !s->sink_errno) {
    ssize_t n = pwrite(s->sink_fd, data + off, len - off, (off_t)(at + off));
    if (n < 0) {
      if (errno == EINTR) continue;
      s->sink_errno = errno;
      break;
    }
    off += (size_t)n;
  }
}

/* Writes what is staged; the staged bytes end at s->received. */
void sink_flush(stoq_stream *s) {
  if (s->wlen && s->sink_fd >= 0) sink_write(s, s->wbuf, s->wlen, s->sink_off + s->received - s->wlen);
  s->wlen = 0;
}

uint64_t stoq_stream_received(const stoq_stream *s) { return s->received; }
int stoq_stream_sink_errno(const stoq_stream *s) { return s->sink_errno; }

void stoq_stream_set_sink(stoq_stream *s, int fd, uint64_t offset, uint64_t limit, int hash) {
  sink_flush(s);
  s->sink_fd = fd;
  if (fd >= 0 && !s->wbuf) s->wbuf = malloc(SINK_BUFFER);
  s->sink_off = offset;
  s->sink_limit = limit;
  if (hash && !s->hashing) {
    if (gnutls_hash_init(&s->hash, GNUTLS_DIG_SHA256) == 0) s->hashing = 1;
  }
}

int stoq_stream_body_sha256(stoq_stream *s, uint8_t out[32]) {
  if (!s->digest_done) return -1;
  memcpy(out, s->digest, 32);
  return 0;
}

void stream_finish_digest(stoq_stream *s) {
  if (s->hashing && !s->digest_done) {
    gnutls_hash_deinit(s->hash, s->digest);
    s->digest_done = 1;
  }
}

/* Takes `len` body bytes that arrive after the s->received already taken: staged (or written
 * straight through when large), hashed, counted. */
void sink_take(stoq_stream *s, const uint8_t *data, size_t len) {
  if (s->sink_fd >= 0 && !s->sink_errno) {
    if (!s->wbuf || len >= SINK_BUFFER) {
      sink_flush(s);
      sink_write(s, data, len, s->sink_off + s->received);
    } else {
      if (s->wlen + len > SINK_BUFFER) sink_flush(s);
      memcpy(s->wbuf + s->wlen, data, len);
      s->wlen += len;
    }
  }
  if (s->hashing) gnutls_hash(s->hash, data, len);
  s->received += len;
}
