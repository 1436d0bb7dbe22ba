/*
 * CSTOQSystem: the few Linux calls Swift cannot make directly (CPU_SET and friends
 * are macros; memfd_create needs _GNU_SOURCE), and the lock-free queue through which
 * workers hand each other datagrams (C11 atomics over preallocated cells).
 */
#ifndef CSTOQSYSTEM_H
#define CSTOQSYSTEM_H
/** Pins the calling thread to `cpu`. Returns 0 or an errno. */
int stoq_pin_current_thread(int cpu);
/** Runs the calling thread under SCHED_IDLE: only on time no other thread of the machine
 *  wants (background work that must never take a worker's core). 0, or -1 with errno. */
int stoq_idle_current_thread(void);
/** Number of CPUs this process may run on. */
int stoq_allowed_cpus(void);
/** An anonymous memory file (memfd_create, close-on-exec), or -1 with errno set: where
 *  request bodies are collected without touching the heap or the disk. */
int stoq_memfd(const char *name);
/* An unnamed file in directory `dir` (O_TMPFILE), read-write, close-on-exec: gone when
 * closed. -1 with errno. */
int stoq_tmpfile(const char *dir);
/** fgetxattr/fsetxattr (sys/xattr.h, which Glibc's Swift module does not bring in): an
 *  object file's owner and digest ride on it. -1 with errno on failure. */
long stoq_fgetxattr(int fd, const char *name, void *value, unsigned long size);
int stoq_fsetxattr(int fd, const char *name, const void *value, unsigned long size);

/** A non-blocking, close-on-exec eventfd (another thread writes 8 bytes to wake a datapath
 *  waiting on it); -1 with errno on failure. */
int stoq_eventfd(void);

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>

/* The CID -> worker layout (STOQ_QUIC_*_WORKER_OFFSET …) that the worker hand-off shares
 * with make_cid and the XDP and reuseport programs. By path, relative to this header: a
 * target's headerSearchPath does not reach the Swift modules that import it. */
#include "../../../bpf/stoq_kern_user.h"

/* ---- hand-off between workers (stoq_handoff.c) ---- */

/** A datagram handed to the worker that owns its connection. */
typedef struct stoq_handoff_item {
  const uint8_t *data;
  uint32_t len;
  uint8_t ecn;
  struct sockaddr_in6 peer, local;
} stoq_handoff_item;

/** Hands the heap's free memory back to the kernel (malloc_trim): glibc keeps what was freed,
 *  so without it a node that held 100 000 connections stays at that size once they close. */
void stoq_release_free_memory(void);

/** Fixes glibc's two heap thresholds (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD), process-wide.
 *  Left to itself glibc raises both after every large mmap'd block it frees: the trim threshold
 *  to twice that block (up to 64 MiB), and malloc_trim gives back what lies in an arena's bins
 *  but not a thread arena's top, so a worker's arena kept up to 64 MiB resident once its
 *  connections had closed. With `trim` fixed, free() hands an arena's top back past `trim`
 *  bytes; `mmap` keeps blocks below it (chunk buffers) in the arenas, reused without faults. */
void stoq_set_heap_thresholds(size_t trim, size_t mmap);

/** A bounded lock-free queue into one worker: any worker pushes, the owner pops. */
typedef struct stoq_handoff stoq_handoff;

/** `capacity` (a power of two) datagrams of at most `max_datagram` bytes, all allocated
 *  now, and an eventfd the owner's datapath waits on. NULL on failure (errno set). */
stoq_handoff *stoq_handoff_create(uint32_t capacity, uint32_t max_datagram);
void stoq_handoff_destroy(stoq_handoff *h);
/** The eventfd that `stoq_handoff_wake` signals. */
int stoq_handoff_wake_fd(const stoq_handoff *h);
/** Any thread: copies the datagram in. 1 = queued; 0 = full or too large (the caller counts it). */
int stoq_handoff_push(stoq_handoff *h, const uint8_t *data, uint32_t len, const struct sockaddr_in6 *peer,
                      const struct sockaddr_in6 *local, uint8_t ecn);
/** Any thread, after pushing: wakes the owner if it sleeps in its datapath. */
void stoq_handoff_wake(const stoq_handoff *h);
/** The owner: the oldest datagram, valid until stoq_handoff_pop; NULL when empty. */
const stoq_handoff_item *stoq_handoff_peek(stoq_handoff *h);
/** The owner: frees the datagram stoq_handoff_peek returned. */
void stoq_handoff_pop(stoq_handoff *h);
#endif
