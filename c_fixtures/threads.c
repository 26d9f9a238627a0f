/* THREADS threads each call hot() CALLS times. Usage: threads [THREADS [CALLS]] (default 8 100000). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static long calls = 100000;

__attribute__((noipa)) long hot(long x) { return x ^ (x >> 3); }

static void *worker(void *arg) {
  long acc = (long)arg;
  for (long i = 0; i < calls; i++) acc += hot(i);
  return (void *)acc;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 8;
  if (argc > 2) calls = atol(argv[2]);
  pthread_t t[64];
  long total = 0;
  for (int i = 0; i < n && i < 64; i++) pthread_create(&t[i], NULL, worker, (void *)(long)i);
  for (int i = 0; i < n && i < 64; i++) {
    void *r;
    pthread_join(t[i], &r);
    total += (long)r;
  }
  printf("threads: %d x %ld, checksum %ld\n", n, calls, total);
  return 0;
}
