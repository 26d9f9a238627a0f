/* The benchmark's program (benches/probes.rs runs it with and without probes).
 *
 *   bench micro N ROUNDS   per call, minimum over ROUNDS rounds of N calls each, interleaved:
 *       bare      a call to an empty function
 *       floor     an int3 caught by an empty SA_SIGINFO handler (installed with a raw
 *                 rt_sigaction, same flags as libuprobe's, so that libuprobe's own handler is
 *                 not in the path): what any trap costs
 *       clock     clock_gettime(CLOCK_MONOTONIC)
 *       probe     probed(): first instruction 5 bytes (a class 1 site)
 *       probe2    probed2(): first instruction 4 bytes (a punned, class 2 site)
 *       probe_ret probed_ret(): for a return probe
 *       probe_args probed_args(a, b): for a traced probe with arguments
 *       deep20    stack_leaf() called 20 frames deep (main's loop, 19 x descend): for %stack
 *     printed as "name ns" lines
 *   bench threads N T      T threads call probed() N times each; prints "ns" (wall time / N)
 *   bench libc N           N rounds of ordinary libc work (malloc, memcpy, strlen, snprintf,
 *                          qsort, free); prints a checksum
 *   bench nothing          exits (the cost of starting a process) */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__attribute__((noipa)) void bare(void) { __asm__ volatile(""); }
/* A 5-byte nop first: the class of the site does not depend on the compiler. */
__attribute__((noipa)) void probed(void) { __asm__ volatile(".byte 0x0f, 0x1f, 0x44, 0, 0"); }
__attribute__((noipa)) void probed_ret(void) { __asm__ volatile(".byte 0x0f, 0x1f, 0x44, 0, 0"); }
__attribute__((noipa)) long probed_args(long a, long b) {
  __asm__ volatile(".byte 0x0f, 0x1f, 0x44, 0, 0");
  return a + b;
}
__attribute__((noipa)) void stack_leaf(void) { __asm__ volatile(".byte 0x0f, 0x1f, 0x44, 0, 0"); }
__attribute__((noipa)) long descend(int d) {
  if (d == 0) {
    stack_leaf();
    return 0;
  }
  return descend(d - 1) + 1; /* not a tail call: every frame stays */
}
/* probed2: lea rax, [rdi + 1] (4 bytes), then ret. */
long probed2(long);
__asm__(".text\n.globl probed2\n.type probed2, @function\n.p2align 4\nprobed2:\n"
        " lea 1(%rdi), %rax\n ret\n");

struct kernel_sigaction { void *handler; unsigned long flags; void *restorer; unsigned long mask; };
#define KSA_RESTORER 0x04000000UL
extern void bench_restorer(void);
__asm__(".text\n.globl bench_restorer\nbench_restorer:\n mov $15, %eax\n syscall\n hlt\n");

static void empty_handler(int sig, siginfo_t *si, void *ctx) { (void)sig; (void)si; (void)ctx; }

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static double time_calls(long n, void (*f)(void)) {
  double t = now_ns();
  for (long i = 0; i < n; i++) f();
  return (now_ns() - t) / n;
}

static volatile long sink;
static double time_probe2(long n) {
  double t = now_ns();
  for (long i = 0; i < n; i++) sink = probed2(i);
  return (now_ns() - t) / n;
}

static double time_deep(long n) {
  double t = now_ns();
  for (long i = 0; i < n; i++) sink = descend(18);
  return (now_ns() - t) / n;
}

static double time_args(long n) {
  double t = now_ns();
  for (long i = 0; i < n; i++) sink = probed_args(i, 7);
  return (now_ns() - t) / n;
}

static double time_clock(long n) {
  struct timespec ts;
  double t = now_ns();
  for (long i = 0; i < n; i++) clock_gettime(CLOCK_MONOTONIC, &ts);
  return (now_ns() - t) / n;
}

static double time_floor(long n) {
  struct kernel_sigaction act = {0}, old;
  act.handler = (void *)empty_handler;
  act.flags = SA_SIGINFO | SA_NODEFER | SA_RESTART | KSA_RESTORER;
  act.restorer = (void *)bench_restorer;
  act.mask = ~0UL & ~((1UL << (SIGSEGV - 1)) | (1UL << (SIGBUS - 1)) | (1UL << (SIGILL - 1)) |
                      (1UL << (SIGFPE - 1)) | (1UL << (SIGTRAP - 1)));
  syscall(SYS_rt_sigaction, SIGTRAP, &act, &old, 8);
  double t = now_ns();
  for (long i = 0; i < n; i++) __asm__ volatile("int3");
  double r = (now_ns() - t) / n;
  syscall(SYS_rt_sigaction, SIGTRAP, &old, NULL, 8);
  return r;
}

static long per_thread;
static void *caller(void *arg) {
  (void)arg;
  for (long i = 0; i < per_thread; i++) probed();
  return NULL;
}

static int cmp_long(const void *a, const void *b) {
  long x = *(const long *)a, y = *(const long *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "micro";
  long n = argc > 2 ? atol(argv[2]) : 200000;
  if (!strcmp(mode, "micro")) {
    const char *pre = getenv("LD_PRELOAD");
    int floor_wanted = !pre || !strstr(pre, "libuprobe");
    int rounds = argc > 3 ? atoi(argv[3]) : 7;
    /* The int3 floor is slow: fewer of them. */
    long nf = n / 20 > 1000 ? n / 20 : 1000;
    double best[8];
    for (int k = 0; k < 8; k++) best[k] = 1e18;
    for (int r = 0; r < rounds; r++) {
      /* The floor is measured without libuprobe only: its raw rt_sigaction takes SIGTRAP from
       * libuprobe, whose own traps (a mask fix where a runtime thread starts late) would then
       * land in the empty handler. */
      double v[8] = {time_calls(n * 4, bare), floor_wanted ? time_floor(nf) : 0, time_clock(n),
                     time_calls(n, probed),   time_probe2(n),      time_calls(n, probed_ret),
                     time_args(n),            time_deep(n / 4)};
      for (int k = 0; k < 8; k++)
        if (v[k] < best[k]) best[k] = v[k];
    }
    printf("bare %.2f\nfloor %.2f\nclock %.2f\nprobe %.2f\nprobe2 %.2f\nprobe_ret %.2f\n"
           "probe_args %.2f\ndeep20 %.2f\n",
           best[0], best[1], best[2], best[3], best[4], best[5], best[6], best[7]);
  } else if (!strcmp(mode, "threads")) {
    int t = argc > 3 ? atoi(argv[3]) : 1;
    pthread_t th[64];
    per_thread = n;
    double start = now_ns();
    for (int i = 0; i < t; i++) pthread_create(&th[i], NULL, caller, NULL);
    for (int i = 0; i < t; i++) pthread_join(th[i], NULL);
    printf("ns %.2f\n", (now_ns() - start) / n);
  } else if (!strcmp(mode, "libc")) {
    unsigned long sum = 0;
    char buf[256];
    for (long i = 0; i < n; i++) {
      long *v = malloc(64 * sizeof(long));
      for (int k = 0; k < 64; k++) v[k] = (k * 7919 + i) % 1000;
      qsort(v, 64, sizeof(long), cmp_long);
      int len = snprintf(buf, sizeof buf, "%ld-%ld-%s", v[0], v[63], "libuprobe");
      char *c = malloc((size_t)len + 1);
      memcpy(c, buf, (size_t)len + 1);
      sum += strlen(c) + (unsigned long)v[32];
      free(c);
      free(v);
    }
    printf("libc %lu\n", sum);
  } else if (!strcmp(mode, "nothing")) {
    return 0;
  } else {
    return 2;
  }
  return 0;
}
