/* Calls typed() with known arguments, for traced events:
 *   typed("hello", -7, -1234567890123, 18446744073709551615, 0xdeadbeef, 3)
 *   typed(<unmapped pointer 0x10>, 0, 0, 0, 0, 0)         the string is "<bad>"
 *   typed(<60 x 'a'>, 1, 2, 3, 4, 5)                       cut at 48 bytes, "..." appended
 *   typed(NULL, ...)                                       "<bad>"
 * then each of THREADS threads calls seq(tid_index, i) for i = 0 .. CALLS-1.
 * Usage: args [THREADS CALLS] (default 0 0). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noipa)) long typed(const char *s, int i, long l, unsigned long u, void *p, int n) {
  return (long)(s != 0) + i + l + (long)u + (long)p + n;
}

__attribute__((noipa)) long seq(long thread, long i) { return thread * 1000000 + i; }

static long calls;

static void *worker(void *arg) {
  long acc = 0;
  for (long i = 0; i < calls; i++) acc += seq((long)arg, i);
  return (void *)acc;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 0;
  calls = argc > 2 ? atol(argv[2]) : 0;
  char longstr[61];
  memset(longstr, 'a', 60);
  longstr[60] = 0;
  long s = typed("hello", -7, -1234567890123L, 18446744073709551615UL, (void *)0xdeadbeef, 3);
  s += typed((const char *)0x10, 0, 0, 0, 0, 0);
  s += typed(longstr, 1, 2, 3, (void *)4, 5);
  s += typed(NULL, 0, 0, 0, 0, 0);
  pthread_t t[64];
  for (long i = 0; i < threads && i < 64; i++) pthread_create(&t[i], NULL, worker, (void *)i);
  for (long i = 0; i < threads && i < 64; i++) pthread_join(t[i], NULL);
  printf("args: %ld\n", s);
  return 0;
}
