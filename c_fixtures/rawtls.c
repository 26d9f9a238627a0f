/* A thread made with a raw clone(CLONE_SETTLS), its fs pointing into a block the program owns
 * (filled with 0x41, with a self pointer at fs:0 as the x86-64 TLS ABI has it), calls work() N
 * times; then the main thread does too. Says whether the block is as it was.
 * Usage: rawtls N */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static unsigned char block[16384] __attribute__((aligned(4096)));
static unsigned char stack[1 << 16] __attribute__((aligned(16)));
static volatile pid_t child_tid = 1;
static volatile long child_sum;

__attribute__((noipa)) long work(long x) { return x * 2 + 1; }

/* Runs on the foreign TLS: no libc but the clone wrapper's exit. */
static int child(void *arg) {
  long n = (long)arg, s = 0;
  for (long i = 0; i < n; i++) s += work(i);
  child_sum = s;
  return 0;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 1000;
  memset(block, 0x41, sizeof block);
  unsigned char *tp = block + sizeof block / 2;
  *(uintptr_t *)tp = (uintptr_t)tp;
  int flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM |
              CLONE_SETTLS | CLONE_CHILD_CLEARTID;
  if (clone(child, stack + sizeof stack, flags, (void *)n, NULL, tp, &child_tid) < 0) return 1;
  while (child_tid != 0) syscall(SYS_futex, &child_tid, FUTEX_WAIT, child_tid, NULL, NULL, 0);
  int intact = 1;
  for (size_t i = 0; i < sizeof block; i++)
    if ((block + i < tp || block + i >= tp + 8) && block[i] != 0x41) intact = 0;
  long s = 0;
  for (long i = 0; i < n; i++) s += work(i);
  printf("rawtls: child %ld main %ld block %s\n", child_sum, s, intact ? "intact" : "CHANGED");
  return 0;
}
