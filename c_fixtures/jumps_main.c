/* Drives the functions of jumps.S for tests/jumps.rs.
 *   classes N        every function N times; a sum per function
 *   blocked N        j_long N times with every signal blocked by a raw system call
 *   signals N        j_long N times while another thread signals this one; the handler calls
 *                    j_long too; prints the calls made
 *   spin T           T threads call j_hot until stdin says "quit"; "count" prints the calls so far
 *   stopper          one thread calls j_long in a loop; prints its tid and j_long's address;
 *                    "count" prints the calls so far, "quit" ends
 *   forks N          N rounds of fork, vfork and posix_spawn whose children call probed functions
 *   busy             one thread calls j_long, j_short, j_endbr, j_push and j_back in turn until
 *                    stdin says "quit"; "count" prints the rounds so far; at the end, the rounds
 *                    and whether every result was right
 *   load LIB         dlopen LIB, then exit */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

long j_long(long), j_hot(long), j_short(long), j_endbr(long), j_push(long), j_back(long),
    j_table(long), j_call(long), j_jmp(long), j_jcc(long), j_riprel(long), j_nop5(long);
extern char **environ;

static atomic_long calls;
static atomic_int stop;
static atomic_long handled;

static void on_usr1(int sig) {
  (void)sig;
  j_long(1);
  handled++;
}

static pid_t main_tid;
static void *signaller(void *arg) {
  (void)arg;
  while (!stop) {
    syscall(SYS_tgkill, getpid(), main_tid, SIGUSR1);
    for (volatile int i = 0; i < 200; i++) {
    }
  }
  return NULL;
}

/* A counter per thread, each on a line of its own, bumped after every call: a count taken at
 * any moment is at most the calls that entered j_hot before it. */
static struct { _Alignas(64) atomic_long n; } per_thread[64];
static long spin_calls(void) {
  long sum = 0;
  for (int i = 0; i < 64; i++) sum += per_thread[i].n;
  return sum;
}
static void *hot_loop(void *arg) {
  atomic_long *mine = &per_thread[(long)arg].n;
  while (!stop) {
    j_hot(1);
    atomic_store_explicit(mine, atomic_load_explicit(mine, memory_order_relaxed) + 1,
                          memory_order_release);
  }
  return NULL;
}

static atomic_int stopper_tid;
static void *stopper_loop(void *arg) {
  (void)arg;
  stopper_tid = (int)syscall(SYS_gettid);
  while (!stop) {
    j_long(2);
    calls++;
  }
  return NULL;
}

static atomic_long rounds;
static atomic_int wrong;
static void *busy_loop(void *arg) {
  (void)arg;
  while (!stop) {
    long r = j_long(1) + j_short(1) + j_endbr(1) + j_push(1) + j_back(1);
    if (r != 17 + 4 + 5 + 6 + 50) wrong = 1;
    rounds++;
  }
  return NULL;
}

static int spinning;
static void serve(void) {
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "count", 5)) {
      printf("calls %ld\n", spinning ? spin_calls() : rounds ? (long)rounds : (long)calls);
      fflush(stdout);
    } else if (!strncmp(line, "quit", 4)) {
      break;
    }
  }
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "classes";
  long n = argc > 2 ? atol(argv[2]) : 10;
  if (!strcmp(mode, "load") && argc < 3) return 2;
  if (!strcmp(mode, "classes")) {
    struct { const char *name; long (*f)(long); } fs[] = {
        {"j_long", j_long}, {"j_short", j_short}, {"j_endbr", j_endbr}, {"j_push", j_push},
        {"j_back", j_back}, {"j_table", j_table}, {"j_call", j_call},   {"j_jmp", j_jmp},
        {"j_jcc", j_jcc},   {"j_riprel", j_riprel}, {"j_nop5", j_nop5}, {"j_hot", j_hot}};
    for (unsigned k = 0; k < sizeof fs / sizeof fs[0]; k++) {
      long sum = 0;
      for (long i = 0; i < n; i++) sum += fs[k].f(i % 7);
      printf("%s %ld\n", fs[k].name, sum);
    }
  } else if (!strcmp(mode, "blocked")) {
    unsigned long all = ~0UL, old = 0;
    syscall(SYS_rt_sigprocmask, SIG_BLOCK, &all, &old, 8);
    long sum = 0;
    for (long i = 0; i < n; i++) sum += j_long(i);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &old, NULL, 8);
    printf("blocked %ld\n", sum);
  } else if (!strcmp(mode, "signals")) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    main_tid = (pid_t)syscall(SYS_gettid);
    pthread_t t;
    pthread_create(&t, NULL, signaller, NULL);
    long sum = 0, i = 0;
    for (; i < n || handled < 2000; i++) sum += j_long(1);
    stop = 1;
    pthread_join(t, NULL);
    long h = handled;
    printf("signals: %s, calls %ld\n", sum == i * 17 ? "sum right" : "sum wrong", i + h);
  } else if (!strcmp(mode, "spin")) {
    pthread_t t[64];
    int k = (int)(n > 64 ? 64 : n);
    spinning = 1;
    for (long i = 0; i < k; i++) pthread_create(&t[i], NULL, hot_loop, (void *)i);
    printf("spinning %d\n", k);
    fflush(stdout);
    serve();
    stop = 1;
    for (int i = 0; i < k; i++) pthread_join(t[i], NULL);
    printf("calls %ld\n", spin_calls());
  } else if (!strcmp(mode, "stopper")) {
    pthread_t t;
    pthread_create(&t, NULL, stopper_loop, NULL);
    while (!stopper_tid) {
    }
    printf("tid %d site %lx\n", stopper_tid, (unsigned long)j_long);
    fflush(stdout);
    serve();
    stop = 1;
    pthread_join(t, NULL);
    printf("calls %ld\n", (long)calls);
  } else if (!strcmp(mode, "busy")) {
    pthread_t t;
    pthread_create(&t, NULL, busy_loop, NULL);
    printf("busy\n");
    fflush(stdout);
    serve();
    stop = 1;
    pthread_join(t, NULL);
    printf("rounds %ld, %s\n", (long)rounds, wrong ? "a result was wrong" : "every result right");
  } else if (!strcmp(mode, "forks")) {
    printf("forking\n");
    fflush(stdout);
    long sum = 0;
    for (long i = 0; i < n; i++) {
      sum += j_long(i);
      pid_t p = fork();
      if (p == 0) _exit((int)(j_long(1) + j_short(1) + j_endbr(1)) & 0x7f);
      int st;
      waitpid(p, &st, 0);
      sum += WEXITSTATUS(st);
      p = vfork();
      if (p == 0) _exit((int)j_short(2) & 0x7f);
      waitpid(p, &st, 0);
      sum += WEXITSTATUS(st);
      char *args[] = {"/bin/true", NULL};
      if (posix_spawn(&p, "/bin/true", NULL, NULL, args, environ) == 0) waitpid(p, &st, 0);
      sum += WEXITSTATUS(st);
    }
    printf("forks %ld: %ld\n", n, sum);
  } else if (!strcmp(mode, "load")) {
    void *h = dlopen(argv[2], RTLD_NOW);
    printf("load: %s\n", h ? "ok" : dlerror());
  } else {
    return 2;
  }
  return 0;
}
