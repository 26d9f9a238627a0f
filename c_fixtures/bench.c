/* Measures, interleaved in one process, per iteration:
 *   bare   a call to an empty function
 *   floor  an int3 caught by an empty SA_SIGINFO handler (installed with a raw rt_sigaction, same
 *          flags as libuprobe's, so that libuprobe's own handler is not in the path), then restored
 *   probe  a call to probed(), on which the benchmark puts a probe (UPROBES=bench:probed)
 *   probe_ret  a call to probed_ret(), on which it may put a return probe (two traps a call)
 * and prints the minimum over ROUNDS rounds, as "name ns_per_iteration" lines.
 * Usage: bench [ITERATIONS [ROUNDS]] (default 200000 7). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__attribute__((noipa)) void bare(void) { __asm__ volatile(""); }
__attribute__((noipa)) void probed(void) { __asm__ volatile(""); }
__attribute__((noipa)) void probed_ret(void) { __asm__ volatile(""); }

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

static double time_bare(long n) {
  double t = now_ns();
  for (long i = 0; i < n; i++) bare();
  return (now_ns() - t) / n;
}

static double time_probe(long n, void (*f)(void)) {
  double t = now_ns();
  for (long i = 0; i < n; i++) f();
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

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 200000;
  int rounds = argc > 2 ? atoi(argv[2]) : 7;
  double best_bare = 1e18, best_floor = 1e18, best_probe = 1e18, best_ret = 1e18;
  for (int r = 0; r < rounds; r++) {
    double b = time_bare(n * 20), f = time_floor(n), p = time_probe(n, probed),
           q = time_probe(n, probed_ret);
    if (b < best_bare) best_bare = b;
    if (f < best_floor) best_floor = f;
    if (p < best_probe) best_probe = p;
    if (q < best_ret) best_ret = q;
  }
  printf("bare %.2f\nfloor %.2f\nprobe %.2f\nprobe_ret %.2f\n", best_bare, best_floor, best_probe,
         best_ret);
  return 0;
}
