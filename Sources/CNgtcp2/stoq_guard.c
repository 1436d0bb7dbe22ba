/* The SIGBUS guard: a response body is sent from a read-only mapping of its file
 * (BodyRegion.mapping), and a file cut short under it (an object replaced in place, `cp` over
 * it, rather than renamed over it) makes the next read past its new end raise SIGBUS, which
 * would end the whole node. Mappings register their range here; a fault inside one gets a page
 * of zeros mapped in its place, so the read (inside ngtcp2's packet writer) completes, and the
 * mapping is recorded for the thread; once the write returns the endpoint resets every stream
 * sending from a recorded mapping (stoq_conn_reset_faulted_streams). A fault anywhere else is
 * left to the default action, as without the guard. */
#include "stoq_internal.h"

#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#define GUARD_SLOTS STOQ_GUARD_SLOTS

static _Atomic uintptr_t guard_start[GUARD_SLOTS];
static _Atomic size_t guard_len[GUARD_SLOTS];
/* The mappings that faulted on this thread since the last stoq_guard_clear; past
 * STOQ_GUARD_FAULTS of them, `guard_overflow` says "any guarded mapping may have". */
static _Thread_local uintptr_t fault_start[STOQ_GUARD_FAULTS];
static _Thread_local size_t fault_len[STOQ_GUARD_FAULTS];
static _Thread_local unsigned fault_count;
static _Thread_local int guard_overflow;
static struct sigaction guard_previous;
static atomic_int guard_installed;
static uintptr_t guard_page = 4096;

/* The slot of the guarded mapping holding `a`, or -1. */
static long guarded(uintptr_t a) {
  for (unsigned i = 0; i < GUARD_SLOTS; i++) {
    uintptr_t s = atomic_load_explicit(&guard_start[i], memory_order_acquire);
    if (s && a >= s && a - s < atomic_load_explicit(&guard_len[i], memory_order_acquire)) return (long)i;
  }
  return -1;
}

/* Records the mapping of slot `i` as faulted on this thread (once). Signal-safe. */
static void record(long i) {
  uintptr_t s = atomic_load_explicit(&guard_start[i], memory_order_acquire);
  size_t len = atomic_load_explicit(&guard_len[i], memory_order_acquire);
  for (unsigned k = 0; k < fault_count; k++)
    if (fault_start[k] == s) return;
  if (fault_count == STOQ_GUARD_FAULTS) {
    guard_overflow = 1;
    return;
  }
  fault_start[fault_count] = s;
  fault_len[fault_count] = len;
  fault_count++;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  (void)sig;
  (void)uc;
  uintptr_t a = (uintptr_t)si->si_addr;
  long slot = si->si_code == BUS_ADRERR ? guarded(a) : -1;
  if (slot >= 0) {
    void *page = (void *)(a & ~(guard_page - 1));
    if (mmap(page, guard_page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
      record(slot);
      return;
    }
  }
  /* Not a guarded mapping: the fault repeats under the action there was before. */
  sigaction(SIGBUS, &guard_previous, NULL);
}

int stoq_guard_install(void) {
  if (atomic_exchange(&guard_installed, 1)) return 0;
  long page = sysconf(_SC_PAGESIZE);
  if (page > 0) guard_page = (uintptr_t)page;
  struct sigaction sa = {0};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  return sigaction(SIGBUS, &sa, &guard_previous);
}

long stoq_guard_add(const void *base, size_t len) {
  uintptr_t s = (uintptr_t)base;
  if (!s || !len || !atomic_load(&guard_installed)) return -1;
  unsigned h = (unsigned)((s / guard_page) * 2654435761u) % GUARD_SLOTS;
  /* Every slot, if need be: a crowded table costs registrations (one per response), never
   * packets, and a mapping is refused only when every slot is taken. */
  for (unsigned k = 0; k < GUARD_SLOTS; k++) {
    unsigned i = (h + k) % GUARD_SLOTS;
    uintptr_t free_slot = 0;
    if (atomic_load_explicit(&guard_start[i], memory_order_relaxed) == 0 &&
        atomic_compare_exchange_strong(&guard_start[i], &free_slot, UINTPTR_MAX)) {
      atomic_store_explicit(&guard_len[i], len, memory_order_release);
      atomic_store_explicit(&guard_start[i], s, memory_order_release);
      return (long)i;
    }
  }
  return -2;
}

void stoq_guard_remove(long slot) {
  if (slot < 0 || slot >= (long)GUARD_SLOTS) return;
  atomic_store_explicit(&guard_len[slot], 0, memory_order_release);
  atomic_store_explicit(&guard_start[slot], 0, memory_order_release);
}

int stoq_guard_faulted(void) { return fault_count > 0 || guard_overflow; }

int stoq_guard_hit(const void *base, size_t len) {
  uintptr_t b = (uintptr_t)base;
  if (!b || !len) return 0;
  if (guard_overflow) return guarded(b) >= 0;
  for (unsigned k = 0; k < fault_count; k++)
    if (b < fault_start[k] + fault_len[k] && fault_start[k] < b + len) return 1;
  return 0;
}

void stoq_guard_clear(void) {
  fault_count = 0;
  guard_overflow = 0;
}

int stoq_conn_reset_faulted_streams(stoq_conn *c, uint64_t code) {
  int n = 0;
  for (stoq_stream *s = c->streams; s; s = s->next) {
    for (unsigned i = 0; i < s->p_count; i++) {
      const struct body_piece *p = &s->pieces[(s->p_head + i) % STOQ_BODY_PIECES];
      if (stoq_guard_hit(p->base, p->len)) {
        stoq_stream_reset(c, s, code);
        n++;
        break;
      }
    }
  }
  stoq_guard_clear();
  /* The packet the faulted write held back for the next call was built from the same
   * mappings: dropped with the rest of that write (ngtcp2 sends its frames again as lost). */
  c->pending_len = 0;
  return n;
}
