/* Calls functions of its own and of libcounted.so a known number of times, prints one line and
 * exits with status 7. Usage: counts [N [close]] (default 1000); with `close` it closes stdout and
 * stderr on its way out, as every gnulib program does (close_stdout).
 *   leaf        N times          lib_add     N times
 *   loop_body   1 time           lib_square  2N times (and lib_mul 2N times through it)
 *   refused_fn  never: its first instruction is ud2, which libuprobe refuses to displace */
#include <stdio.h>
#include <stdlib.h>

int lib_add(int a, int b);
int lib_square(int a);

__attribute__((noipa)) int leaf(int x) { return x * 3 + 1; }

__attribute__((noipa)) long loop_body(long n) {
  long s = 0;
  for (long i = 0; i < n; i++) s += leaf((int)i);
  return s;
}

__attribute__((naked, noipa)) void refused_fn(void) { __asm__("ud2"); }

static void close_std(void) {
  fclose(stdout);
  fclose(stderr);
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1000;
  if (argc > 2) atexit(close_std);
  long s = 0;
  for (int i = 0; i < n; i++) s += lib_add(i, 1);
  for (int i = 0; i < 2 * n; i++) s += lib_square(i & 7);
  s += loop_body(n);
  printf("counts: %ld\n", s);
  return 7;
}
