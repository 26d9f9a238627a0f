#include <stdio.h>
int ctor_work(int);
int main(void) {
  int s = ctor_work(1) + ctor_work(2);
  printf("ctor: %d\n", s);
  return 0;
}
