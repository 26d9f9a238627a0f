/* Known call stacks, for %stack and flame graphs. Usage: stacks N
 * For i in 0..N: i % 3 == 0 -> walk_even(2), else walk_odd(1). walk_* call lib_apply (libstk.so,
 * no frame pointers), which calls visit once per element. So visit is reached from
 *   main;walk_even;lib_apply;visit   2 * ceil(N / 3) times
 *   main;walk_odd;lib_apply;visit    N - ceil(N / 3) times
 * Built with -O2 -fomit-frame-pointer, no sibling calls (each frame stays on the stack). */
#include <stdio.h>
#include <stdlib.h>

long lib_apply(long (*f)(long), long n);
static volatile long sink;

__attribute__((noinline)) long visit(long i) {
  sink += i;
  return i * 2;
}
__attribute__((noinline)) long walk_even(long n) { return lib_apply(visit, n) + 1; }
__attribute__((noinline)) long walk_odd(long n) { return lib_apply(visit, n) ^ 1; }

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 10, s = 0;
  for (long i = 0; i < n; i++) s += i % 3 == 0 ? walk_even(2) : walk_odd(1);
  printf("stacks: %ld\n", s);
  return 0;
}
