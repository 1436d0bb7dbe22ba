/*
 * Body sinks: where the body a peer sends goes. The loop thread (a worker, or the client's
 * loop) copies received body bytes into fixed 256 KB buffers; a full buffer is queued on a
 * single-producer/single-consumer ring to the endpoint's writer thread, which hashes it
 * (SHA-256, when asked) and writes it to the stream's file descriptor at the stream's offset.
 * The loop never waits for the page cache, a disk or a pipe reader.
 *
 * Back-pressure is QUIC flow control: the body bytes of a stream that writes to a file are
 * given back to the peer (MAX_STREAM_DATA / MAX_DATA) only once they are written, so what
 * the peer may still send is at most one stream window ahead of the disk. The ring can hold
 * one such window (its size is the endpoint's largest stream window, and fill_settings keeps
 * the window within it), so a slow disk slows the sender, not the loop, and memory stays at
 * most the ring. Only several streams of one endpoint together can fill it; the loop then
 * waits for the writer (counted in `waits`): memory stays bounded either way.
 *
 * Ordering: one writer per endpoint takes jobs in the order queued, so a stream's bytes are
 * hashed in order. Events that tell the application a body is over (a request's end; any
 * stream's close) come only after every queued write of that stream landed, so a PUT's temp
 * file is fsynced after its last write and its errno is final when read.
 *
 * Why C: every received body byte passes here, once per STREAM frame; staging in C keeps the
 * per-packet path free of Swift calls and allocations (buffers are allocated on first need,
 * at most `max_bufs` per endpoint, and reused until the endpoint goes).
 */
#define _GNU_SOURCE
#include "stoq_internal.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

/* One write: large enough that a GiB costs ~4000 syscalls, small enough that credit goes back
 * to the peer in steps far below a window. Page aligned (O_DIRECT-ready, and whole pages for
 * the page cache). */
#define SINK_BUF (256u << 10)
/* Wakeups cost a context switch each when the writer shares the loop's core. The loop wakes the
 * writer once per turn, or after this many buffers; the writer signals the loop's eventfd after
 * this many, or when it runs out of work. (Measured, 1 GiB to tmpfs with the client on one
 * core: 14,100 context switches with one wakeup per buffer each way, 11,600-14,900 batched,
 * 10,500 discarding: most are the io_uring loop's own waits.) */
#define SINK_BATCH 8

struct sink_job {
  stoq_stream *s; /* NULL once the stream is gone (its result was taken at drain) */
  uint8_t *buf;
  uint64_t off;
  uint32_t len;
  int fd;
  int seq_write; /* not a file (a pipe, a socket, a terminal): write(), no offset there */
  gnutls_hash_hd_t hash;
  int hashing;
  int err; /* the writer's result: errno of the failed write, 0 if written */
};

struct stoq_sink_writer {
  stoq_endpoint_ctx *ep;
  pthread_t thread;
  int started, start_failed;
  struct sink_job *ring;
  uint64_t mask;
  /* head: jobs queued (producer); tail: jobs done (writer); reaped: done jobs whose results
   * the producer took (producer only). reaped <= tail <= head. */
  _Atomic uint64_t head, tail;
  uint64_t reaped;
  uint64_t kicked;    /* head when the writer was last woken (producer only) */
  size_t fill;        /* a stream's buffer is queued at this many bytes (<= SINK_BUF) */
  uint64_t conn_fill; /* ... or when its connection has this many staged in all */
  uint8_t **free_bufs;
  unsigned nfree, nbufs, max_bufs;
  pthread_mutex_t mu;
  pthread_cond_t work, done;
  _Atomic int writer_idle, producer_waiting, stop;
  _Atomic int wake_fd; /* signalled as jobs finish: the loop comes back to give credit */
  int own_wake_fd;
  stoq_sink_stats stats;
  _Atomic uint64_t bytes_written; /* the writer's count */
};

/* ---- the writer thread -------------------------------------------------------- */

static int write_all(const struct sink_job *j) {
  size_t off = 0;
  while (off < j->len) {
    ssize_t n = j->seq_write ? write(j->fd, j->buf + off, j->len - off)
                             : pwrite(j->fd, j->buf + off, j->len - off, (off_t)(j->off + off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    off += (size_t)n;
  }
  return 0;
}

static void signal_loop(stoq_sink_writer *w) {
  int fd = atomic_load_explicit(&w->wake_fd, memory_order_relaxed);
  if (fd >= 0) {
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) < 0) { /* saturated: the loop is awake already */
    }
  }
}

static void *writer_main(void *arg) {
  stoq_sink_writer *w = arg;
  unsigned unsignalled = 0;
  for (;;) {
    uint64_t t = atomic_load_explicit(&w->tail, memory_order_relaxed);
    if (t == atomic_load(&w->head)) {
      if (unsignalled) {
        unsignalled = 0;
        signal_loop(w);
      }
      pthread_mutex_lock(&w->mu);
      atomic_store(&w->writer_idle, 1);
      while (t == atomic_load(&w->head) && !atomic_load(&w->stop)) pthread_cond_wait(&w->work, &w->mu);
      atomic_store(&w->writer_idle, 0);
      pthread_mutex_unlock(&w->mu);
      if (t == atomic_load(&w->head)) return NULL; /* stopped with nothing queued */
      continue;
    }
    struct sink_job *j = &w->ring[t & w->mask];
    if (j->hashing) gnutls_hash(j->hash, j->buf, j->len);
    if (j->fd >= 0 && !j->err) {
      j->err = write_all(j);
      if (!j->err) atomic_fetch_add_explicit(&w->bytes_written, j->len, memory_order_relaxed);
    }
    atomic_store(&w->tail, t + 1);
    if (atomic_load(&w->producer_waiting)) {
      pthread_mutex_lock(&w->mu);
      pthread_cond_signal(&w->done);
      pthread_mutex_unlock(&w->mu);
    }
    if (++unsignalled >= SINK_BATCH) {
      unsignalled = 0;
      signal_loop(w);
    }
  }
}

/* Where the writer runs. By default on the CPUs the process may use (its main thread's mask:
 * what taskset or the operator allowed), not on the core of the worker that created it: a
 * node's worker is pinned and is the bottleneck of an upload, and the writer's page-cache copy
 * (0.42-0.44 CPU s/GiB on tmpfs, measured) is better done where there is room. STOQ_SINK_CPU=
 * loop keeps the creating loop's affinity, any allows every CPU, N one CPU (for measuring;
 * docs/architecture.md). */
static void writer_placement(void) {
  const char *e = getenv("STOQ_SINK_CPU");
  if (e && strcmp(e, "loop") == 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (e && strcmp(e, "any") == 0) {
    for (int i = 0; i < CPU_SETSIZE; i++) CPU_SET(i, &set);
  } else if (e && *e) {
    CPU_SET(atoi(e), &set);
  } else if (sched_getaffinity(getpid(), sizeof(set), &set) != 0) {
    return;
  }
  (void)sched_setaffinity(0, sizeof(set), &set);
}

static void *writer_start(void *arg) {
  writer_placement();
  return writer_main(arg);
}

stoq_sink_writer *sink_writer_new(stoq_endpoint_ctx *ep, uint64_t ring_bytes) {
  stoq_sink_writer *w = calloc(1, sizeof(*w));
  if (!w) return NULL;
  w->ep = ep;
  /* Staged bytes keep their credit too: a quarter of the initial stream and connection
   * windows at most, so a peer always has credit left to fill (and queue) what is staged. */
  uint64_t fill = SINK_BUF, stream_window = ep->s.initial_max_stream_data, conn_window = ep->s.initial_max_data;
  if (stream_window && stream_window / 4 < fill) fill = stream_window / 4;
  if (fill < 4096) fill = 4096;
  w->fill = (size_t)fill;
  w->conn_fill = conn_window ? conn_window / 4 : UINT64_MAX;
  w->max_bufs = (unsigned)(ring_bytes / SINK_BUF);
  uint64_t cap = 1;
  while (cap < w->max_bufs) cap <<= 1;
  w->ring = calloc(cap, sizeof(*w->ring));
  w->free_bufs = calloc(w->max_bufs, sizeof(*w->free_bufs));
  w->own_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (!w->ring || !w->free_bufs || w->own_wake_fd < 0) {
    if (w->own_wake_fd >= 0) close(w->own_wake_fd);
    free(w->ring);
    free(w->free_bufs);
    free(w);
    return NULL;
  }
  w->mask = cap - 1;
  atomic_store(&w->wake_fd, w->own_wake_fd);
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->work, NULL);
  pthread_cond_init(&w->done, NULL);
  return w;
}

void sink_writer_free(stoq_sink_writer *w) {
  if (!w) return;
  if (w->started) {
    pthread_mutex_lock(&w->mu);
    atomic_store(&w->stop, 1);
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
  }
  /* Every stream drained before its connection went, so every buffer is free again. */
  for (unsigned i = 0; i < w->nfree; i++) free(w->free_bufs[i]);
  close(w->own_wake_fd);
  pthread_mutex_destroy(&w->mu);
  pthread_cond_destroy(&w->work);
  pthread_cond_destroy(&w->done);
  free(w->ring);
  free(w->free_bufs);
  free(w);
}

int stoq_endpoint_ctx_sink_wake_fd(const stoq_endpoint_ctx *ep) { return ep->sink ? ep->sink->own_wake_fd : -1; }

void stoq_endpoint_ctx_set_sink_wake_fd(stoq_endpoint_ctx *ep, int fd) {
  if (ep->sink) atomic_store(&ep->sink->wake_fd, fd >= 0 ? fd : ep->sink->own_wake_fd);
}

void stoq_endpoint_ctx_sink_stats(const stoq_endpoint_ctx *ep, stoq_sink_stats *out) {
  memset(out, 0, sizeof(*out));
  if (!ep->sink) return;
  *out = ep->sink->stats;
  out->buffers = ep->sink->nbufs;
  out->ring_bytes = (uint64_t)ep->sink->max_bufs * SINK_BUF;
  out->bytes_written = atomic_load_explicit(&ep->sink->bytes_written, memory_order_relaxed);
  out->jobs_pending = atomic_load_explicit(&ep->sink->head, memory_order_relaxed) - ep->sink->reaped;
}

/* ---- the producer: the loop thread ------------------------------------------------ */

/* Wakes the writer for what was queued since the last time (if it sleeps). */
static void kick(stoq_sink_writer *w) {
  uint64_t h = atomic_load_explicit(&w->head, memory_order_relaxed);
  if (h == w->kicked) return;
  w->kicked = h;
  if (atomic_load(&w->writer_idle)) {
    pthread_mutex_lock(&w->mu);
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
  }
}

/* Waits until the writer has finished job `seq` (exclusive: tail > seq). */
static void wait_done(stoq_sink_writer *w, uint64_t seq) {
  if (atomic_load(&w->tail) > seq) return;
  kick(w);
  pthread_mutex_lock(&w->mu);
  atomic_store(&w->producer_waiting, 1);
  while (atomic_load(&w->tail) <= seq) pthread_cond_wait(&w->done, &w->mu);
  atomic_store(&w->producer_waiting, 0);
  pthread_mutex_unlock(&w->mu);
}

/* A stream's body is over for the application only when nothing of it is queued: its digest
 * is final, and a server hears the request's end now. */
static void stream_settle(stoq_stream *s) {
  if (s->pending || !s->end_waiting) return;
  s->end_waiting = 0;
  stream_finish_digest(s);
  stoq_conn *c = s->conn;
  if (c->is_server && !s->end_told && c->ep->ev.on_request_end) {
    s->end_told = 1;
    c->ep->ev.on_request_end(c->ep->ev.ctx, c, s, 0);
  }
}

/* Takes the results of finished jobs: buffers back to the pool, errors to their streams,
 * credit back to the peer, and body ends that waited for their writes. */
static int sink_reap(stoq_sink_writer *w) {
  uint64_t t = atomic_load(&w->tail);
  int n = 0;
  while (w->reaped < t) {
    struct sink_job *j = &w->ring[w->reaped & w->mask];
    w->free_bufs[w->nfree++] = j->buf;
    stoq_stream *s = j->s;
    w->reaped++;
    n++;
    if (!s) continue; /* taken at its stream's drain */
    w->stats.bytes_queued -= j->len;
    s->pending--;
    if (j->err && !s->sink_errno) s->sink_errno = j->err;
    stoq_conn *c = s->conn;
    consume(c, s->id, j->len);
    if (c->ep->ev.on_sink_progress) c->ep->ev.on_sink_progress(c->ep->ev.ctx, c);
    stream_settle(s);
  }
  return n;
}

int stoq_endpoint_ctx_sink_poll(stoq_endpoint_ctx *ep) {
  if (!ep->sink) return 0;
  kick(ep->sink); /* once per turn of the loop: what this turn queued */
  return sink_reap(ep->sink);
}

static void writer_ensure_started(stoq_sink_writer *w) {
  if (w->started || w->start_failed) return;
  if (pthread_create(&w->thread, NULL, writer_start, w) == 0) {
    w->started = 1;
    pthread_setname_np(w->thread, "stoq-sink"); /* top -H, and the benchmark's CPU split */
  } else {
    w->start_failed = 1;
  }
}

/* A buffer to fill: from the pool, a new one while under the cap, else once the writer has
 * finished one. NULL only when none will come back (nothing queued: every buffer is some
 * stream's partial one) or none can be made. */
static uint8_t *buf_get(stoq_sink_writer *w) {
  for (;;) {
    if (w->nfree) return w->free_bufs[--w->nfree];
    if (w->nbufs < w->max_bufs) {
      void *p = NULL;
      if (posix_memalign(&p, 4096, SINK_BUF) != 0) return NULL;
      w->nbufs++;
      return p;
    }
    if (w->reaped == atomic_load(&w->head)) return NULL;
    w->stats.waits++;
    wait_done(w, w->reaped);
    sink_reap(w);
  }
}

/* Queues what the stream has staged. The bytes' credit is withheld until the writer is done. */
static void stream_queue(stoq_stream *s) {
  stoq_sink_writer *w = s->conn->ep->sink;
  if (!s->wbuf) return;
  if (!s->wlen) return;
  uint64_t h = atomic_load_explicit(&w->head, memory_order_relaxed);
  /* The ring has a slot for every buffer, so a queued buffer always finds one. */
  w->ring[h & w->mask] = (struct sink_job){
      .s = s,
      .buf = s->wbuf,
      .off = s->sink_off + s->received - s->wlen,
      .len = (uint32_t)s->wlen,
      .fd = s->sink_fd,
      .seq_write = s->seq_write,
      .hash = s->hash,
      .hashing = s->hashing,
  };
  s->conn->sink_staged -= s->wlen;
  s->wbuf = NULL;
  s->wlen = 0;
  s->pending++;
  s->last_seq = h;
  w->stats.jobs++;
  atomic_store(&w->head, h + 1);
  if (h + 1 - w->kicked >= SINK_BATCH) kick(w);
}

/* No buffer to be had: written here, on the loop, as before the writer existed. Only when
 * nothing of the stream is queued, so order holds. */
static void write_inline(stoq_stream *s, const uint8_t *data, size_t len) {
  struct sink_job j = {.buf = (uint8_t *)(uintptr_t)data,
                       .len = (uint32_t)len,
                       .off = s->sink_off + s->received,
                       .fd = s->sink_fd,
                       .seq_write = s->seq_write};
  if (s->hashing) gnutls_hash(s->hash, data, len);
  if (s->sink_fd >= 0 && !s->sink_errno) s->sink_errno = write_all(&j);
}

/* Takes `len` body bytes that arrive after the s->received already taken. Returns how many of
 * them were queued: their credit comes back when they are written; the rest is done with. */
size_t sink_take(stoq_stream *s, const uint8_t *data, size_t len) {
  stoq_sink_writer *w = s->conn->ep->sink;
  if (s->sink_errno && s->wbuf) {
    /* A write failed: what is staged goes nowhere (its offset would be past the bytes skipped
     * since), and its credit goes back now. */
    consume(s->conn, s->id, s->wlen);
    s->conn->sink_staged -= s->wlen;
    w->stats.bytes_queued -= s->wlen;
    w->free_bufs[w->nfree++] = s->wbuf;
    s->wbuf = NULL;
    s->wlen = 0;
  }
  /* Discarding (fd -1, no hash), or after a failed write: nothing to wait for. */
  if (!s->queued_sink || s->sink_errno || !w) {
    if (s->hashing && !s->queued_sink) gnutls_hash(s->hash, data, len);
    s->received += len;
    return 0;
  }
  if (w->reaped != atomic_load_explicit(&w->tail, memory_order_acquire)) sink_reap(w);
  size_t queued = 0;
  while (len) {
    if (!s->wbuf) {
      s->wbuf = buf_get(w);
      if (!s->wbuf) {
        if (s->pending) { /* cannot happen: a queued job of ours frees a buffer */
          wait_done(w, s->last_seq);
          sink_reap(w);
          continue;
        }
        w->stats.inline_writes++;
        write_inline(s, data, len);
        s->received += len;
        return queued;
      }
    }
    size_t n = w->fill - s->wlen;
    if (n > len) n = len;
    memcpy(s->wbuf + s->wlen, data, n);
    s->wlen += n;
    s->conn->sink_staged += n;
    s->received += n;
    queued += n;
    w->stats.bytes_queued += n;
    if (w->stats.bytes_queued > w->stats.peak_bytes_queued) w->stats.peak_bytes_queued = w->stats.bytes_queued;
    data += n;
    len -= n;
    if (s->wlen >= w->fill || s->conn->sink_staged >= w->conn_fill) {
      writer_ensure_started(w);
      stream_queue(s);
    }
  }
  return queued;
}

/* Queues the partial buffer (the body ended, or the sink changes). */
void sink_flush(stoq_stream *s) {
  if (!s->wbuf) return;
  stoq_sink_writer *w = s->conn->ep->sink;
  if (s->wlen) {
    writer_ensure_started(w);
    stream_queue(s);
    kick(w);
  } else {
    w->free_bufs[w->nfree++] = s->wbuf;
    s->wbuf = NULL;
  }
}

/* The body ended (fin): the request's end and the digest wait for the queued writes. */
void sink_end(stoq_stream *s) {
  sink_flush(s);
  s->end_waiting = 1;
  stream_settle(s);
}

/* Blocks until every queued write of the stream landed and takes their results (credit
 * back too); its jobs no longer point at it. For a stream about to close (`closing`: no
 * request end is announced any more, the digest is just finished) or to change its sink:
 * rare, and at most one stream window of writes. */
void sink_drain(stoq_stream *s, int closing) {
  stoq_sink_writer *w = s->conn->ep->sink;
  if (w) {
    sink_flush(s);
    if (s->pending) {
      w->stats.drain_waits++;
      wait_done(w, s->last_seq);
      uint64_t t = atomic_load(&w->tail);
      for (uint64_t i = w->reaped; i < t; i++) {
        struct sink_job *j = &w->ring[i & w->mask];
        if (j->s != s) continue;
        if (j->err && !s->sink_errno) s->sink_errno = j->err;
        consume(s->conn, s->id, j->len);
        w->stats.bytes_queued -= j->len;
        j->s = NULL; /* its buffer goes back at reap */
        s->pending--;
      }
    }
  }
  if (closing) {
    s->end_waiting = 0;
    stream_finish_digest(s);
  } else {
    stream_settle(s);
  }
}

uint64_t stoq_stream_received(const stoq_stream *s) { return s->received; }
void stoq_stream_set_body_mark(stoq_stream *s, uint64_t bytes) { s->mark = bytes; }
int stoq_stream_sink_errno(const stoq_stream *s) { return s->sink_errno; }

void stoq_stream_set_sink(stoq_stream *s, int fd, uint64_t offset, uint64_t limit, int hash) {
  sink_drain(s, 0);
  s->sink_fd = fd;
  s->sink_off = offset;
  s->sink_limit = limit;
  s->seq_write = 0;
  if (fd >= 0) {
    struct stat st;
    /* Only a file (or a block device) has offsets: a pipe, a socket, a terminal take write(). */
    if (fstat(fd, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) s->seq_write = 1;
  }
  if (hash && !s->hashing) {
    if (gnutls_hash_init(&s->hash, GNUTLS_DIG_SHA256) == 0) s->hashing = 1;
  }
  /* Through the writer when there is a file to write (hashing alone stays inline); its thread
   * starts now, so that a failure to start writes inline rather than queueing for no one. */
  stoq_sink_writer *w = s->conn->ep->sink;
  if (fd >= 0 && w) writer_ensure_started(w);
  s->queued_sink = fd >= 0 && w && w->started;
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
