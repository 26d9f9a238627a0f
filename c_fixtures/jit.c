/* A program that handles SIGSEGV itself, as a JIT does: one thread writes to a guard page and
 * recovers with siglongjmp, as fast as it can, and raises its own SIGTRAP now and then. It has no
 * other thread, so an attach must use this one, in the middle of all this. It looks at stdin now
 * and then; on "quit" it says what it saw: every SIGTRAP it raised caught, every fault recovered.
 * tests/attach.rs attaches to it while this goes on. */
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static sigjmp_buf env;
static volatile char *guard;
static volatile long faults, traps_caught, traps_raised, calls;

__attribute__((noipa)) long tick(long x) { return x + 1; }

static void on_segv(int sig, siginfo_t *si, void *ctx) {
  (void)sig, (void)ctx;
  if (si->si_addr != (void *)guard) _exit(99); /* not ours: a real crash */
  siglongjmp(env, 1);
}

static void on_trap(int sig) {
  (void)sig;
  traps_caught++;
}

static int quit_asked(void) {
  struct pollfd p = {.fd = 0, .events = POLLIN};
  if (poll(&p, 1, 0) <= 0) return 0;
  char line[64];
  return !fgets(line, sizeof line, stdin) || !strncmp(line, "quit", 4);
}

int main(void) {
  guard = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  struct sigaction sa = {.sa_sigaction = on_segv, .sa_flags = SA_SIGINFO};
  sigaction(SIGSEGV, &sa, NULL);
  signal(SIGTRAP, on_trap);
  printf("ready\n");
  fflush(stdout);
  for (;;) {
    if (sigsetjmp(env, 1) == 0) *guard = 1;
    faults++;
    calls += tick(0);
    if (faults % 20000 == 0) {
      traps_raised++;
      raise(SIGTRAP);
    }
    if (faults % 4096 == 0 && quit_asked()) break;
  }
  printf("jit: traps %s, faults %s\n", traps_caught == traps_raised ? "all caught" : "LOST",
         faults > 0 && calls == faults ? "recovered" : "WRONG");
  return 0;
}
