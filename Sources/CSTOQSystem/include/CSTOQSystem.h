/*
 * CSTOQSystem: the few Linux calls Swift cannot make directly (CPU_SET and friends
 * are macros). Kept tiny on purpose.
 */
#ifndef CSTOQSYSTEM_H
#define CSTOQSYSTEM_H
/** Pins the calling thread to `cpu`. Returns 0 or an errno. */
int stoq_pin_current_thread(int cpu);
/** Number of CPUs this process may run on. */
int stoq_allowed_cpus(void);
#endif
