/* Return probes. Usage: ret MODE [N]
 *   values      add3(i, 2i, 3i) for i = 0..4: returns 6i
 *   fib N       fib(N) recursively: 2*fib(N+1)-1 calls
 *   longjmp N   N times: jumper() recurses 3 deep and longjmps out; then plain() N times
 *   backtrace   bt_leaf(), called through bt_mid(), prints the function names of its backtrace
 *   deep N      one recursion deep(N-1) .. deep(0): N nested calls
 *   exit        a thread calls exiter(), which calls pthread_exit
 *   fork        forker() forks; parent and child both return from it
 *   forkdeep N  deep(N-1) (too deep: missed returns), then fork; the child calls deep(9)
 *   tail N      tail_outer(i) N times: it tail-calls tail_inner(i + 1) with a jmp (assembly, so
 *               that no compiler setting changes it); both return i + 2
 *   sleep N     sleeper() N times, each sleeping 1 ms; on stderr, the time each call took as the
 *               caller measured it around the call (CLOCK_MONOTONIC): the shortest, the longest
 *               and their sum, in ns */
#define _GNU_SOURCE
#include <execinfo.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noipa)) long add3(long a, long b, long c) { return a + b + c; }
__attribute__((noipa)) long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

static jmp_buf env;
__attribute__((noipa)) long jumper(int depth) {
  if (depth == 0) longjmp(env, 1);
  return jumper(depth - 1) + 1;
}
__attribute__((noipa)) long plain(long x) { return x + 1; }

__attribute__((noipa)) int bt_leaf(void) {
  void *frames[32];
  int n = backtrace(frames, 32);
  char **names = backtrace_symbols(frames, n);
  for (int i = 0; i < n; i++) {
    /* "path(function+0xoff) [0xaddr]": print only "function" */
    char *open = strchr(names[i], '('), *plus = open ? strchr(open, '+') : NULL;
    if (open && plus && plus > open + 1) printf("frame %.*s\n", (int)(plus - open - 1), open + 1);
  }
  free(names);
  return n;
}
__attribute__((noipa)) int bt_mid(void) { return bt_leaf() + 1; }

__attribute__((noipa)) long deep(long n) { return n == 0 ? 0 : deep(n - 1) + 1; }

__attribute__((noipa)) void exiter(void) { pthread_exit((void *)42); }
static void *exit_thread(void *arg) {
  (void)arg;
  exiter();
  return NULL;
}

__attribute__((noipa)) pid_t forker(void) { return fork(); }

__attribute__((noipa)) long sleeper(void) {
  struct timespec ms = {0, 1000000};
  return nanosleep(&ms, NULL);
}
static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

long tail_outer(long x);
__attribute__((noipa, used)) long tail_inner(long x) { return x + 1; }
__asm__(".text\n.globl tail_outer\n.type tail_outer, @function\ntail_outer:\n"
        "  add $1, %rdi\n  jmp tail_inner\n.size tail_outer, . - tail_outer\n");

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "";
  long n = argc > 2 ? atol(argv[2]) : 0, s = 0;
  if (!strcmp(mode, "values")) {
    for (long i = 0; i < 5; i++) s += add3(i, 2 * i, 3 * i);
  } else if (!strcmp(mode, "fib")) {
    s = fib(n);
  } else if (!strcmp(mode, "longjmp")) {
    for (long i = 0; i < n; i++)
      if (setjmp(env) == 0) s += jumper(3);
    for (long i = 0; i < n; i++) s += plain(i);
  } else if (!strcmp(mode, "backtrace")) {
    s = bt_mid();
  } else if (!strcmp(mode, "deep")) {
    s = deep(n - 1);
  } else if (!strcmp(mode, "exit")) {
    pthread_t t;
    void *r;
    pthread_create(&t, NULL, exit_thread, NULL);
    pthread_join(t, &r);
    s = (long)r;
  } else if (!strcmp(mode, "fork")) {
    pid_t pid = forker();
    if (pid == 0) exit(0);
    int st;
    waitpid(pid, &st, 0);
    s = WIFEXITED(st) && WEXITSTATUS(st) == 0;
  } else if (!strcmp(mode, "forkdeep")) {
    s = deep(n - 1);
    pid_t pid = fork();
    if (pid == 0) {
      deep(9);
      exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
  } else if (!strcmp(mode, "tail")) {
    for (long i = 0; i < n; i++) s += tail_outer(i);
  } else if (!strcmp(mode, "sleep")) {
    long long lo = -1, hi = 0, sum = 0;
    for (long i = 0; i < n; i++) {
      long long a = now_ns();
      s += sleeper() + 1;
      long long d = now_ns() - a;
      lo = lo < 0 || d < lo ? d : lo;
      hi = d > hi ? d : hi;
      sum += d;
    }
    fprintf(stderr, "outer %lld %lld %lld\n", lo, hi, sum);
  } else {
    return 2;
  }
  printf("ret %s: %ld\n", mode, s);
  return 0;
}
