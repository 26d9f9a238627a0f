/* Sampled as a profiler samples: ITIMER_PROF, and in each SIGPROF handler the interrupted pc and
 * the handler's backtrace(). The work is a tiny function called in a loop, which a probe on it
 * makes spend most of its time in libuprobe's code (its body, or on the full way its Rust code);
 * or a probe on main's loop head (`loop_head`: main's frame is rsp-based, -fomit-frame-pointer).
 * The first SAMPLES samples are kept, and checked after: each backtrace must go through the
 * interrupted frame and every caller to _start, as it does without libuprobe. The handler also
 * calls in_handler(), for a probe with %stack there (libuprobe's own unwinder, through the signal
 * frame). Prints how many samples there were, whether some had a pc in no loaded object, how many
 * unwound; then, on stderr, each pc in no object in hex (for the perf map check). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>

#define SAMPLES 64
#define FRAMES 64

static volatile int taken, calls;
static void *pcs[SAMPLES];
static void *frames[SAMPLES][FRAMES];
static int depth[SAMPLES];

__attribute__((noipa)) long work(long x) { return x * 3 + 1; }
__attribute__((noipa)) void in_handler(void) { __asm__ volatile(""); }

static void on_prof(int sig, siginfo_t *si, void *ctx) {
  (void)sig, (void)si;
  ucontext_t *uc = ctx;
  in_handler();
  calls++;
  if (taken >= SAMPLES) return;
  pcs[taken] = (void *)uc->uc_mcontext.gregs[REG_RIP];
  depth[taken] = backtrace(frames[taken], FRAMES);
  taken++;
}

int main(void) {
  void *warm[4];
  backtrace(warm, 4); /* libgcc_s loaded now, not in the handler */
  struct sigaction sa = {.sa_sigaction = on_prof, .sa_flags = SA_SIGINFO | SA_RESTART};
  sigaction(SIGPROF, &sa, NULL);
  struct itimerval it = {{0, 500}, {0, 500}};
  setitimer(ITIMER_PROF, &it, NULL);
  long acc = 0;
  while (taken < SAMPLES)
    for (int i = 0; i < 10000; i++) {
      /* A probe here is a loop head's, in the middle of main's frame. */
      __asm__ volatile(".globl loop_head\n.type loop_head, @function\nloop_head:");
      acc += work(i);
    }
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_PROF, &off, NULL);
  int outside = 0, unwound = 0;
  for (int s = 0; s < SAMPLES; s++) {
    Dl_info di;
    if (!dladdr(pcs[s], &di)) outside++;
    for (int f = 0; f < depth[s]; f++) {
      if (dladdr(frames[s][f], &di) && di.dli_sname && !strcmp(di.dli_sname, "_start")) {
        unwound++;
        break;
      }
    }
  }
  printf("samples: %d, outside every object: %s, unwound to _start: %d (%ld)\n", SAMPLES,
         outside ? "some" : "none", unwound, acc & 1);
  fprintf(stderr, "pid %d\nhandler calls %d\n", (int)getpid(), calls);
  for (int s = 0; s < SAMPLES; s++) {
    Dl_info di;
    if (!dladdr(pcs[s], &di)) fprintf(stderr, "pc %lx\n", (unsigned long)pcs[s]);
  }
  return 0;
}
