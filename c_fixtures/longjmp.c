/* A program whose signal handler leaves by siglongjmp, from wherever the signal landed: inside a
 * probed function's hit too (with %stack, most of each call is libuprobe's). Then it loads a
 * library (which makes libuprobe publish a new table) and says it is done. Usage: longjmp N LIB */
#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <unistd.h>

static sigjmp_buf env;
static volatile long sink;
static volatile long jumps, want;

__attribute__((noinline)) long visit(long i) {
  sink += i;
  return i;
}

static void on_alarm(int sig) {
  (void)sig;
  /* Once there were enough, a tick that comes before the timer is stopped changes nothing (the
   * count printed would otherwise depend on where it landed). */
  if (jumps < want) siglongjmp(env, 1);
}

int main(int argc, char **argv) {
  want = argc > 1 ? atol(argv[1]) : 2000;
  alarm(60); /* a hang ends the test, not the job */
  struct sigaction sa = {.sa_handler = on_alarm};
  sigaction(SIGVTALRM, &sa, NULL);
  struct itimerval it = {{0, 200}, {0, 200}};
  if (sigsetjmp(env, 1)) jumps++;
  if (jumps == 0) setitimer(ITIMER_VIRTUAL, &it, NULL);
  while (jumps < want) visit(jumps);
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_VIRTUAL, &off, NULL);
  for (int i = 0; i < 3; i++) {
    void *h = dlopen(argv[2], RTLD_NOW);
    if (!h) return 2;
    dlclose(h);
  }
  printf("longjmp: %ld jumps, then a library loaded\n", (long)jumps);
  return 0;
}
