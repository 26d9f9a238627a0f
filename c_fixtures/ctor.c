/* A library whose constructor and destructor call a probed function: libuprobe must be in place
 * before the first and still there after the last. */
__attribute__((noipa)) int ctor_work(int x) { return x + 1; }
__attribute__((constructor)) static void start(void) {
  for (int i = 0; i < 5; i++) ctor_work(i);
}
__attribute__((destructor)) static void finish(void) {
  for (int i = 0; i < 3; i++) ctor_work(i);
}
