/* Faults in probed instructions, and single-stepping through one, as the program's own handlers
 * see them: each prints where the fault was (function + offset), then skips the instruction,
 * or jumps out of the handler with siglongjmp. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

long fl_load(long *p);
long fl_div(long a, long b);
long fl_call(void *table);
void fl_step(void);
extern char fl_load_insn[], fl_div_insn[], fl_call_insn[], fl_step_a[];

static sigjmp_buf env;
static long steps[16];
static int nsteps;

__attribute__((noipa)) long probed_after(long x) { return x * 3; }

static const char *where(uintptr_t rip, long *off) {
  const char *names[] = {"fl_load_insn", "fl_div_insn", "fl_call_insn"};
  uintptr_t addrs[] = {(uintptr_t)fl_load_insn, (uintptr_t)fl_div_insn, (uintptr_t)fl_call_insn};
  int best = -1;
  for (int i = 0; i < 3; i++)
    if (rip >= addrs[i] && rip < addrs[i] + 16 && (best < 0 || addrs[i] > addrs[best])) best = i;
  if (best < 0) {
    *off = 0;
    return "elsewhere";
  }
  *off = (long)(rip - addrs[best]);
  return names[best];
}

static void on_fault(int sig, siginfo_t *si, void *ctx) {
  ucontext_t *uc = ctx;
  uintptr_t rip = uc->uc_mcontext.gregs[REG_RIP];
  long off;
  const char *name = where(rip, &off);
  printf("%s at %s+%ld, si_addr %s\n", sig == SIGSEGV ? "SIGSEGV" : "SIGFPE", name, off,
         (uintptr_t)si->si_addr == rip ? "= rip" : (si->si_addr ? "data" : "null"));
  if (rip == (uintptr_t)fl_call_insn) siglongjmp(env, 1);
  uc->uc_mcontext.gregs[REG_RIP] += 3; /* skip the 3-byte instruction */
  uc->uc_mcontext.gregs[REG_RAX] = 0xdead;
}

static void on_trap(int sig, siginfo_t *si, void *ctx) {
  (void)sig;
  ucontext_t *uc = ctx;
  if (si->si_code == TRAP_TRACE && nsteps < 16)
    steps[nsteps++] = (long)(uc->uc_mcontext.gregs[REG_RIP] - (uintptr_t)fl_step_a);
}

int main(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGFPE, &sa, NULL);
  sa.sa_sigaction = on_trap;
  sigaction(SIGTRAP, &sa, NULL);

  long v = 42;
  printf("fl_load(NULL) = %#lx\n", fl_load(NULL));
  printf("fl_load(&v) = %ld\n", fl_load(&v));
  printf("fl_div(10, 0) = %#lx\n", fl_div(10, 0));
  printf("fl_div(10, 3) = %ld\n", fl_div(10, 3));
  if (sigsetjmp(env, 1) == 0) {
    fl_call((void *)0x10);
    printf("not reached\n");
  } else {
    printf("recovered with siglongjmp\n");
  }
  long s = 0;
  for (int i = 0; i < 5; i++) s += probed_after(i);
  printf("probed_after: %ld\n", s);
  fl_step();
  printf("single steps at:");
  for (int i = 0; i < nsteps; i++) printf(" %+ld", steps[i]);
  printf("\n");
  return 0;
}
