/* libstk.so, built without frame pointers (-O2 -fomit-frame-pointer): lib_apply calls back into
 * the program with rbp holding garbage, so that only the call frame information (.eh_frame) can
 * find its caller. */
long lib_apply(long (*f)(long), long n) {
  volatile long scratch[4] = {0, 1, 2, 3};
  long s = 0;
  for (long i = 0; i < n; i++) {
    /* rbp is an ordinary register here: make it hold nothing like a frame. */
    __asm__ volatile("mov $0x5a5a5a5a5a5a5a5a, %%rbp" ::: "rbp");
    s += f(i) + scratch[i & 3];
  }
  return s;
}
