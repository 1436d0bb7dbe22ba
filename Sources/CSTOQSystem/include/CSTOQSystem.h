/*
 * CSTOQSystem: the few Linux calls Swift cannot make directly (CPU_SET and friends
 * are macros; memfd_create needs _GNU_SOURCE). Kept tiny on purpose.
 */
#ifndef CSTOQSYSTEM_H
#define CSTOQSYSTEM_H
/** Pins the calling thread to `cpu`. Returns 0 or an errno. */
int stoq_pin_current_thread(int cpu);
/** Number of CPUs this process may run on. */
int stoq_allowed_cpus(void);
/** An anonymous memory file (memfd_create, close-on-exec), or -1 with errno set: where
 *  request bodies are collected without touching the heap or the disk. */
int stoq_memfd(const char *name);
#endif
