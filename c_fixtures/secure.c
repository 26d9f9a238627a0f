/* Run as a setuid or file-capability program (tests/security.rs): says whether the kernel put it
 * in secure-execution mode, calls work() as often as argv[1] says, and says how many threads the
 * process has (libuprobe's threads, when it runs) and whether libuprobe is mapped. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

__attribute__((noipa)) long work(long x) { return x * 7 + 1; }

static int tasks(void) {
  int n = 0;
  DIR *d = opendir("/proc/self/task");
  struct dirent *e;
  while (d && (e = readdir(d)))
    if (e->d_name[0] != '.') n++;
  if (d) closedir(d);
  return n;
}

static int mapped(const char *what) {
  char line[4096];
  int found = 0;
  FILE *f = fopen("/proc/self/maps", "r");
  while (f && fgets(line, sizeof line, f))
    if (strstr(line, what)) found = 1;
  if (f) fclose(f);
  return found;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 1000, s = 0;
  for (long i = 0; i < n; i++) s += work(i);
  printf("secure %lu\nwork %ld %ld\nthreads %d\nlibuprobe %s\n", getauxval(AT_SECURE), n, s,
         tasks(), mapped("libuprobe.so") ? "mapped" : "not mapped");
  return 0;
}
