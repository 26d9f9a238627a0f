// C++ exceptions thrown through return-probed frames: through() calls thrower(), which throws for
// odd numbers; main catches. The unwinder must never see the return trampoline.
#include <cstdio>
#include <stdexcept>

extern "C" __attribute__((noipa)) int thrower(int x) {
  if (x % 2) throw std::runtime_error("odd");
  return x;
}

extern "C" __attribute__((noipa)) int through(int x) { return thrower(x) + 1; }

int main() {
  int sum = 0, caught = 0;
  for (int i = 0; i < 10; i++) {
    try {
      sum += through(i);
    } catch (const std::exception &e) {
      caught++;
    }
  }
  std::printf("exc: sum %d, caught %d\n", sum, caught);
  return 0;
}
