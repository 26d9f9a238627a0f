/* Processes. Usage: forks MODE ...
 *   fork P C       f() P times, fork; the child calls f() C times and exits; the parent waits and
 *                  calls f() P more times                       parent f: 2P, child f: C
 *   storm K C LIB  4 threads call f() and one thread maps and unmaps LIB executable in a loop (so
 *                  the runtime installs and forgets probes of LIB, under its lock) while the main
 *                  thread forks K children, each of which calls f() C times and exits
 *                                                               each child f: C
 *                  (Not dlopen/dlclose: a fork during dlclose's __cxa_finalize leaves glibc's
 *                  __exit_funcs_lock held in the child, which then hangs in exit, probes or not.)
 *   vfork PROG C   vfork; the child calls f() 5 times (on the parent's memory) and execs PROG C;
 *                  the parent calls f() once                                      parent f: 1
 *   spawn PROG C   posix_spawn PROG C, then f() once                              parent f: 1
 *   chain N K      f() K times, then execs itself as `chain N-1 K` until N is 0   each image f: K
 *   clone C        a raw clone(SIGCHLD) system call (no atfork handlers run); the child calls f()
 *                  C times and exits; the parent calls f() once                   parent f: 1
 * Exits 0 when every child exited 0. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

__attribute__((noipa)) long f(long x) { return x * 2 + 1; }

static long call_f(long n) {
  long s = 0;
  for (long i = 0; i < n; i++) s += f(i);
  return s;
}

static int wait_ok(pid_t pid) {
  int st;
  if (waitpid(pid, &st, 0) != pid) return 0;
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static volatile int stop;
static const char *storm_lib;

static void *hammer(void *arg) {
  (void)arg;
  long s = 0;
  while (!stop) s += f(s & 0xff);
  return (void *)s;
}

static void *churn(void *arg) {
  (void)arg;
  int fd = open(storm_lib, O_RDONLY);
  struct stat st;
  fstat(fd, &st);
  while (!stop) {
    void *p = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (p != MAP_FAILED) munmap(p, st.st_size);
  }
  close(fd);
  return NULL;
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "";
  int ok = 1;
  if (!strcmp(mode, "fork") && argc == 4) {
    long p = atol(argv[2]), c = atol(argv[3]);
    call_f(p);
    pid_t pid = fork();
    if (pid == 0) {
      call_f(c);
      exit(0);
    }
    ok = wait_ok(pid);
    call_f(p);
  } else if (!strcmp(mode, "storm") && argc == 5) {
    long k = atol(argv[2]), c = atol(argv[3]);
    storm_lib = argv[4];
    pthread_t t[5];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, hammer, NULL);
    pthread_create(&t[4], NULL, churn, NULL);
    for (long i = 0; i < k; i++) {
      pid_t pid = fork();
      if (pid == 0) {
        call_f(c);
        exit(0);
      }
      ok &= wait_ok(pid);
    }
    stop = 1;
    for (int i = 0; i < 5; i++) pthread_join(t[i], NULL);
  } else if (!strcmp(mode, "vfork") && argc == 4) {
    pid_t pid = vfork();
    if (pid == 0) {
      call_f(5);
      execl(argv[2], argv[2], argv[3], (char *)NULL);
      _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    ok = WIFEXITED(st) && WEXITSTATUS(st) == 7; /* the counts fixture exits 7 */
    call_f(1);
  } else if (!strcmp(mode, "spawn") && argc == 4) {
    pid_t pid;
    char *args[] = {argv[2], argv[3], NULL};
    ok = posix_spawn(&pid, argv[2], NULL, NULL, args, environ) == 0;
    int st;
    waitpid(pid, &st, 0);
    ok &= WIFEXITED(st) && WEXITSTATUS(st) == 7;
    call_f(1);
  } else if (!strcmp(mode, "chain") && argc == 4) {
    long n = atol(argv[2]), k = atol(argv[3]);
    call_f(k);
    if (n > 0) {
      char next[32];
      snprintf(next, sizeof next, "%ld", n - 1);
      char *args[] = {argv[0], "chain", next, argv[3], NULL};
      execv("/proc/self/exe", args);
      return 3;
    }
  } else if (!strcmp(mode, "clone") && argc == 3) {
    long c = atol(argv[2]);
    long pid = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) {
      call_f(c);
      syscall(SYS_exit_group, 0);
    }
    ok = wait_ok((pid_t)pid);
    call_f(1);
  } else {
    fprintf(stderr, "usage: see forks.c\n");
    return 2;
  }
  printf("forks %s: %s\n", mode, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
