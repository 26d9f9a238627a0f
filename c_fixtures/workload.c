/* A libc workload: each of ITER iterations makes exactly one call each to malloc, free, memcpy and
 * strlen (built with -fno-builtin so none is inlined), then a little stdio, qsort, snprintf, strtol
 * and a thread, so that probing all of libc has plenty to hit. Usage: workload [ITER] (default 1000). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

static void *side_thread(void *arg) {
  char buf[64];
  snprintf(buf, sizeof buf, "thread %ld", (long)arg);
  return (void *)strlen(buf);
}

int main(int argc, char **argv) {
  long iter = argc > 1 ? strtol(argv[1], NULL, 10) : 1000;
  static const char text[] = "the quick brown fox jumps over the lazy dog";
  unsigned long sum = 0;
  for (long i = 0; i < iter; i++) {
    size_t n = 8 + (size_t)(i % 32);
    char *p = malloc(n + 1);
    memcpy(p, text, n);
    p[n] = 0;
    sum += strlen(p);
    free(p);
  }
  int v[16];
  for (int i = 0; i < 16; i++) v[i] = (i * 7919) % 31;
  qsort(v, 16, sizeof v[0], cmp_int);
  pthread_t t;
  void *r;
  pthread_create(&t, NULL, side_thread, (void *)7L);
  pthread_join(t, &r);
  char line[128];
  snprintf(line, sizeof line, "workload: sum=%lu min=%d max=%d thread=%ld", sum, v[0], v[15], (long)r);
  puts(line);
  fprintf(stderr, "workload: done\n");
  return 0;
}
