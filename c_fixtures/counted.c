/* A shared library whose functions the counts fixture calls a known number of times. Built a
 * second time with -DPAD as libcounted2.so: the same functions at other offsets. */
#ifdef PAD
__attribute__((noipa)) void lib_pad(void) { __asm__ volatile(".skip 301, 0x90"); }
#endif
__attribute__((noipa)) int lib_add(int a, int b) { return a + b; }
__attribute__((noipa)) int lib_mul(int a, int b) { return a * b; }
__attribute__((noipa)) int lib_square(int a) { return lib_mul(a, a); }
/* An alias: the same site as lib_add under another name. */
int lib_sum(int a, int b) __attribute__((alias("lib_add")));
