#define _GNU_SOURCE
#include <sys/eventfd.h>
#include "CSTOQSystem.h"
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/xattr.h>

int stoq_pin_current_thread(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

int stoq_idle_current_thread(void) {
  struct sched_param p = {.sched_priority = 0};
  return sched_setscheduler(0, SCHED_IDLE, &p);
}

int stoq_allowed_cpus(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return CPU_COUNT(&set);
}

int stoq_memfd(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int stoq_tmpfile(const char *dir) { return open(dir, O_RDWR | O_TMPFILE | O_CLOEXEC, 0600); }

long stoq_fgetxattr(int fd, const char *name, void *value, unsigned long size) {
  return (long)fgetxattr(fd, name, value, size);
}

int stoq_fsetxattr(int fd, const char *name, const void *value, unsigned long size) {
  return fsetxattr(fd, name, value, size, 0);
}

int stoq_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

void stoq_release_free_memory(void) { malloc_trim(0); }

void stoq_set_heap_thresholds(size_t trim, size_t mmap) {
  mallopt(M_TRIM_THRESHOLD, (int)trim);
  mallopt(M_MMAP_THRESHOLD, (int)mmap);
}
