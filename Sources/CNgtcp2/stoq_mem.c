/*
 * The allocator an endpoint gives ngtcp2 and nghttp3: malloc for small blocks, whole pages of
 * a region the endpoint reserves for blocks of a page and more.
 *
 * Why pages: the libraries size their pools when a connection is made — nghttp3 64 streams'
 * worth (43 KB), ngtcp2 its frames', packets', streams' and key lists' blocks (4–12 KB each) —
 * and an idle connection writes the first page of each (nghttp3's: two), 16 pages of the 43
 * they take. A page never written is never resident; but malloc hands out recycled heap, the
 * handshake's freed TLS buffers among it, whose pages are. Here a large block is pages no one
 * has written since the kernel zeroed them, unless a closed connection's block is reused warm.
 *
 * Freed blocks wait warm in a stack per size (in pages), for the next connections to reuse
 * without page faults, until the worker releases memory after a wave of closes
 * (stoq_endpoint_ctx_release_memory): then their pages go back to the kernel (MADV_DONTNEED, one
 * call per run of adjacent blocks: a connection's blocks were carved together) and they wait
 * cold, as runs of pages sorted by address (16 bytes a run, however many blocks it held, so a
 * wave of 100,000 closes leaves a few runs, not a million entries); once no block is held the
 * region starts over.
 * Freeing costs no system call, so 20,000 closes a second stay cheap. Zeroed requests (calloc:
 * a struct about to be filled in, every page of it) stay malloc's, which packs them tighter.
 * One endpoint, one thread: no locks. Without the region (the reservation failed) or past it,
 * everything is malloc's.
 */
#include "stoq_internal.h"

#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PAGE 4096u
/* A block's first 16 bytes say how many pages it has (malloc's alignment is kept). */
#define HEADER 16u
/* Larger requests than this are malloc's (which maps them itself). */
#define MAX_PAGES 32u
/* What an endpoint reserves (address space, not memory: MAP_NORESERVE), and the least it
 * settles for when the system refuses that much. 64 GiB is ~400,000 idle connections. */
#define RESERVE_MAX (64ull << 30)
#define RESERVE_MIN (256ull << 20)

typedef struct block_stack {
  void **at;
  uint32_t n, cap;
} block_stack;

/* Pages given back to the kernel, free for the taking. */
typedef struct page_run {
  uint8_t *at;
  size_t pages;
} page_run;

/* Cold runs looked at for a block before carving new pages instead. */
#define COLD_LOOK 16u

struct stoq_pages {
  uint8_t *base, *next, *end;
  block_stack warm[MAX_PAGES + 1];
  page_run *cold; /* by address; the last is taken from first */
  size_t ncold, coldcap;
  uint64_t live;     /* blocks the libraries hold */
  uint64_t released; /* blocks whose pages went back to the kernel */
};

static int push(block_stack *s, void *b) {
  if (s->n == s->cap) {
    uint32_t cap = s->cap ? 2 * s->cap : 64;
    void **at = realloc(s->at, cap * sizeof(*at));
    if (!at) return -1;
    s->at = at;
    s->cap = cap;
  }
  s->at[s->n++] = b;
  return 0;
}

static void forget_stacks(stoq_pages *p) {
  for (uint32_t pages = 1; pages <= MAX_PAGES; pages++) {
    free(p->warm[pages].at);
    p->warm[pages] = (block_stack){0};
  }
  free(p->cold);
  p->cold = NULL;
  p->ncold = p->coldcap = 0;
}

/* `pages` pages from the end of one of the last COLD_LOOK cold runs, or NULL. */
static uint8_t *take_cold(stoq_pages *p, size_t pages) {
  for (size_t k = 0; k < p->ncold && k < COLD_LOOK; k++) {
    page_run *r = &p->cold[p->ncold - 1 - k];
    if (r->pages < pages) continue;
    r->pages -= pages;
    uint8_t *b = r->at + r->pages * PAGE;
    if (r->pages == 0) {
      memmove(r, r + 1, (size_t)(p->cold + p->ncold - (r + 1)) * sizeof(*r));
      p->ncold--;
    }
    return b;
  }
  return NULL;
}

stoq_pages *stoq_pages_new(void) {
  stoq_pages *p = calloc(1, sizeof(*p));
  if (!p) return NULL;
  for (uint64_t size = RESERVE_MAX; size >= RESERVE_MIN; size /= 2) {
    void *r = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r != MAP_FAILED) {
      p->base = p->next = r;
      p->end = p->base + size;
      break;
    }
  }
  return p; /* without a region: malloc for everything */
}

void stoq_pages_free(stoq_pages *p) {
  if (!p) return;
  if (p->base) munmap(p->base, (size_t)(p->end - p->base));
  forget_stacks(p);
  free(p);
}

static int owns(const stoq_pages *p, const void *q) {
  return (const uint8_t *)q >= p->base && (const uint8_t *)q < p->end;
}

/* A block of `size` bytes (its pages' worth, less the header). NULL: not for the region (small,
 * too large, or the region is spent). */
static void *pages_take(stoq_pages *p, size_t size) {
  if (!p->base || size < PAGE - HEADER) return NULL;
  size_t pages = (size + HEADER + PAGE - 1) / PAGE;
  if (pages > MAX_PAGES) return NULL;
  uint8_t *b;
  if (p->warm[pages].n) {
    b = p->warm[pages].at[--p->warm[pages].n];
  } else if ((b = take_cold(p, pages))) {
  } else if ((size_t)(p->end - p->next) >= pages * PAGE) {
    b = p->next;
    p->next += pages * PAGE;
  } else {
    return NULL;
  }
  *(uint32_t *)b = (uint32_t)pages;
  p->live++;
  return b + HEADER;
}

static size_t pages_size(const void *q) { return *(const uint32_t *)((const uint8_t *)q - HEADER) * PAGE - HEADER; }

static void pages_put(stoq_pages *p, void *q) {
  uint8_t *b = (uint8_t *)q - HEADER;
  uint32_t pages = *(uint32_t *)b;
  p->live--;
  /* No room to remember it: its pages go back now, its address space until the region starts over. */
  if (push(&p->warm[pages], b) != 0) {
    madvise(b, (size_t)pages * PAGE, MADV_DONTNEED);
    p->released++;
  }
}

static int by_address(const void *x, const void *y) {
  const uint8_t *a = ((const page_run *)x)->at, *b = ((const page_run *)y)->at;
  return (a > b) - (a < b);
}

void stoq_pages_release(stoq_pages *p) {
  size_t n = 0;
  for (uint32_t pages = 1; pages <= MAX_PAGES; pages++) n += p->warm[pages].n;
  /* Every block is free: the region starts over, its stacks with it. */
  if (p->live == 0 && p->next != p->base) {
    madvise(p->base, (size_t)(p->next - p->base), MADV_DONTNEED);
    forget_stacks(p);
    p->next = p->base;
    p->released += n;
    return;
  }
  if (!n) return;
  /* The warm blocks and the cold runs, sorted and merged into runs; the warm ones' pages go
   * back, one call per run of adjacent warm blocks. */
  if (p->ncold + n > p->coldcap) {
    size_t cap = p->ncold + n;
    page_run *cold = realloc(p->cold, cap * sizeof(*cold));
    if (!cold) return; /* no room to sort: they stay warm until the next release */
    p->cold = cold;
    p->coldcap = cap;
  }
  page_run *fresh = p->cold + p->ncold;
  size_t k = 0;
  for (uint32_t pages = 1; pages <= MAX_PAGES; pages++) {
    for (uint32_t i = 0; i < p->warm[pages].n; i++) fresh[k++] = (page_run){p->warm[pages].at[i], pages};
    free(p->warm[pages].at);
    p->warm[pages] = (block_stack){0};
  }
  qsort(fresh, n, sizeof(*fresh), by_address);
  for (size_t i = 0; i < n;) {
    uint8_t *start = fresh[i].at, *end = start;
    for (; i < n && fresh[i].at == end; i++) end += fresh[i].pages * PAGE;
    madvise(start, (size_t)(end - start), MADV_DONTNEED);
  }
  size_t all = p->ncold + n, runs = 0;
  qsort(p->cold, all, sizeof(*p->cold), by_address);
  for (size_t i = 0; i < all; i++) {
    page_run *last = runs ? &p->cold[runs - 1] : NULL;
    if (last && last->at + last->pages * PAGE == p->cold[i].at) last->pages += p->cold[i].pages;
    else p->cold[runs++] = p->cold[i];
  }
  p->ncold = runs;
  /* Keep the array no larger than twice its runs. */
  if (p->coldcap > 64 && p->coldcap > 2 * runs) {
    page_run *cold = realloc(p->cold, (runs ? runs : 1) * sizeof(*cold));
    if (cold) {
      p->cold = cold;
      p->coldcap = runs ? runs : 1;
    }
  }
  p->released += n;
}

void stoq_pages_read(const stoq_pages *p, uint64_t *warm_bytes, uint64_t *released, uint64_t *cold_runs,
                     uint64_t *cold_bytes) {
  *warm_bytes = 0;
  for (uint32_t pages = 1; pages <= MAX_PAGES; pages++) *warm_bytes += (uint64_t)p->warm[pages].n * pages * PAGE;
  *released = p->released;
  *cold_runs = p->ncold;
  *cold_bytes = 0;
  for (size_t i = 0; i < p->ncold; i++) *cold_bytes += p->cold[i].pages * PAGE;
}

/* ---- The libraries' allocators ----------------------------------------------------------- */

/* ngtcp2_mem and nghttp3_mem have the same shape; their user_data is a stoq_mem_user: the
 * endpoint's pages and the total this library holds. */

static size_t held(const stoq_mem_user *u, const void *q) {
  return owns(u->pages, q) ? pages_size(q) : malloc_usable_size((void *)q);
}

void *stoq_mem_malloc(size_t size, void *user) {
  stoq_mem_user *u = user;
  void *q = pages_take(u->pages, size);
  if (!q) q = malloc(size);
  if (q) u->bytes += (int64_t)held(u, q);
  return q;
}

void *stoq_mem_calloc(size_t n, size_t size, void *user) {
  stoq_mem_user *u = user;
  void *q = calloc(n, size);
  if (q) u->bytes += (int64_t)malloc_usable_size(q);
  return q;
}

void stoq_mem_free(void *q, void *user) {
  stoq_mem_user *u = user;
  if (!q) return;
  u->bytes -= (int64_t)held(u, q);
  if (owns(u->pages, q)) pages_put(u->pages, q);
  else free(q);
}

void *stoq_mem_realloc(void *q, size_t size, void *user) {
  stoq_mem_user *u = user;
  if (!q) return stoq_mem_malloc(size, user);
  if (size == 0) {
    stoq_mem_free(q, user);
    return NULL;
  }
  if (!owns(u->pages, q) && size < PAGE - HEADER) { /* stays malloc's */
    int64_t before = (int64_t)malloc_usable_size(q);
    void *r = realloc(q, size);
    if (r) u->bytes += (int64_t)malloc_usable_size(r) - before;
    return r;
  }
  size_t have = held(u, q);
  if (size <= have && owns(u->pages, q)) return q;
  void *r = stoq_mem_malloc(size, user);
  if (!r) return NULL;
  memcpy(r, q, have < size ? have : size);
  stoq_mem_free(q, user);
  return r;
}
