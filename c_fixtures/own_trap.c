/* A program with its own SIGTRAP handling, run under probes on probed().
 * It must see exactly what it sees without libuprobe: its handler gets its own int3 and raise()
 * traps, sigaction reports its own handler, errno survives a probe hit, probes fire even while it
 * blocks every signal, and with `own_trap die` an int3 with no handler kills it by SIGTRAP. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static volatile int handled, siginfo_codes_ok;

__attribute__((noipa)) int probed(int x) { return x + 1; }

static void on_trap(int sig, siginfo_t *si, void *ctx) {
  (void)ctx;
  handled++;
  if (sig == SIGTRAP && (si->si_code == SI_KERNEL || si->si_code == SI_TKILL)) siginfo_codes_ok++;
  probed(100); /* a probe hit inside the program's own handler */
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "die") == 0) {
    probed(0);
    __asm__ volatile("int3");
    puts("not reached");
    return 0;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_trap;
  sa.sa_flags = SA_SIGINFO;
  sigfillset(&sa.sa_mask);
  sigaction(SIGTRAP, &sa, NULL);
  int s = 0;
  for (int i = 0; i < 5; i++) {
    __asm__ volatile("int3");
    s += probed(i);
    raise(SIGTRAP);
  }
  struct sigaction cur;
  sigaction(SIGTRAP, NULL, &cur);
  printf("handler is the program's: %d\n", cur.sa_sigaction == on_trap);
  printf("handled %d traps, %d with the expected si_code\n", handled, siginfo_codes_ok);
  errno = 1234;
  s += probed(0);
  printf("errno after a probe hit: %d\n", errno);
  sigset_t all, old;
  sigfillset(&all);
  sigprocmask(SIG_BLOCK, &all, &old);
  s += probed(1);
  sigprocmask(SIG_SETMASK, &old, NULL);
  printf("sum %d\n", s);
  return 0;
}
