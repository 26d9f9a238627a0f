/* A long-running program driven line by line on stdin, for the control-socket tests:
 *   call N     call target() N times; prints "done N"
 *   spin T     start T threads calling target() in a loop and checking every result
 *   stop       stop them; prints "stopped CALLS WRONG" (calls made, wrong results seen)
 *   addr       prints the runtime address of target as "addr 0x..."
 *   quit       exit 0
 * A probe must never change what target returns. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noipa)) long target(long x) { return x * 3 + 1; }

static volatile int stop;
static long calls[64], wrong[64];

static void *spinner(void *arg) {
  long id = (long)arg;
  for (long i = 0; !stop; i++) {
    if (target(i) != i * 3 + 1) wrong[id]++;
    calls[id]++;
  }
  return NULL;
}

int main(void) {
  char line[256];
  pthread_t t[64];
  int threads = 0;
  setvbuf(stdout, NULL, _IOLBF, 0);
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "call ", 5)) {
      long n = atol(line + 5), s = 0;
      for (long i = 0; i < n; i++) s += target(i);
      printf("done %ld\n", n);
    } else if (!strncmp(line, "spin ", 5)) {
      threads = atoi(line + 5);
      if (threads > 64) threads = 64;
      stop = 0;
      for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, spinner, (void *)i);
      printf("spinning %d\n", threads);
    } else if (!strncmp(line, "stop", 4)) {
      stop = 1;
      long c = 0, w = 0;
      for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        c += calls[i];
        w += wrong[i];
      }
      printf("stopped %ld %ld\n", c, w);
    } else if (!strncmp(line, "addr", 4)) {
      printf("addr %p\n", (void *)target);
    } else if (!strncmp(line, "quit", 4)) {
      return 0;
    }
  }
  return 0;
}
