/*
 * A bounded multi-producer, single-consumer queue of datagrams: how one worker hands
 * another a datagram for a connection the other owns (the connection's worker id is in
 * its CIDs, and the NIC or the kernel delivered the datagram elsewhere: a migrated
 * client, a queue without its own worker). Lock-free, after Dmitry Vyukov's bounded
 * queue: each cell carries a sequence number that says whose turn it is, producers claim
 * cells by compare-and-swap on the tail, the one consumer walks the head. Every cell is
 * allocated up front; pushing and popping never allocate.
 */
#define _GNU_SOURCE
#include "CSTOQSystem.h"
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct cell {
  _Atomic size_t seq;
  stoq_handoff_item item;
};

struct stoq_handoff {
  _Alignas(64) _Atomic size_t tail; /* producers */
  _Alignas(64) size_t head;         /* the consumer */
  _Alignas(64) size_t mask;
  uint32_t max_datagram, cell_size;
  uint8_t *cells;
  int wake_fd;
};

static inline struct cell *cell_at(const stoq_handoff *h, size_t pos) {
  return (struct cell *)(h->cells + (pos & h->mask) * h->cell_size);
}

stoq_handoff *stoq_handoff_create(uint32_t capacity, uint32_t max_datagram) {
  if (capacity < 2 || (capacity & (capacity - 1))) return NULL;
  stoq_handoff *h = calloc(1, sizeof(*h));
  if (!h) return NULL;
  h->mask = capacity - 1;
  h->max_datagram = max_datagram;
  h->cell_size = (uint32_t)((sizeof(struct cell) + max_datagram + 63) & ~(size_t)63);
  h->cells = aligned_alloc(64, (size_t)capacity * h->cell_size);
  h->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (!h->cells || h->wake_fd < 0) {
    stoq_handoff_destroy(h);
    return NULL;
  }
  for (size_t i = 0; i < capacity; i++) {
    struct cell *c = cell_at(h, i);
    atomic_init(&c->seq, i);
    c->item.data = (const uint8_t *)(c + 1);
  }
  return h;
}

void stoq_handoff_destroy(stoq_handoff *h) {
  if (!h) return;
  if (h->wake_fd >= 0) close(h->wake_fd);
  free(h->cells);
  free(h);
}

int stoq_handoff_wake_fd(const stoq_handoff *h) { return h->wake_fd; }

int stoq_handoff_push(stoq_handoff *h, const uint8_t *data, uint32_t len, const struct sockaddr_in6 *peer,
                      const struct sockaddr_in6 *local, uint8_t ecn) {
  if (len > h->max_datagram) return 0;
  size_t pos = atomic_load_explicit(&h->tail, memory_order_relaxed);
  struct cell *c;
  for (;;) {
    c = cell_at(h, pos);
    size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
    intptr_t dif = (intptr_t)seq - (intptr_t)pos;
    if (dif == 0) {
      if (atomic_compare_exchange_weak_explicit(&h->tail, &pos, pos + 1, memory_order_relaxed, memory_order_relaxed))
        break;
    } else if (dif < 0) {
      return 0; /* full: QUIC recovers a lost datagram */
    } else {
      pos = atomic_load_explicit(&h->tail, memory_order_relaxed);
    }
  }
  memcpy((uint8_t *)(c + 1), data, len);
  c->item.len = len;
  c->item.ecn = ecn;
  c->item.peer = *peer;
  c->item.local = *local;
  atomic_store_explicit(&c->seq, pos + 1, memory_order_release);
  return 1;
}

void stoq_handoff_wake(const stoq_handoff *h) {
  uint64_t one = 1;
  if (write(h->wake_fd, &one, sizeof(one)) < 0) { /* the counter is saturated: already awake */
  }
}

const stoq_handoff_item *stoq_handoff_peek(stoq_handoff *h) {
  struct cell *c = cell_at(h, h->head);
  size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
  return seq == h->head + 1 ? &c->item : NULL;
}

void stoq_handoff_pop(stoq_handoff *h) {
  struct cell *c = cell_at(h, h->head);
  atomic_store_explicit(&c->seq, h->head + h->mask + 1, memory_order_release);
  h->head++;
}
