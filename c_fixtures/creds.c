/* Changes what its thread may do, as real programs do (tests/security.rs), then compares every
 * thread of the process: credentials, capabilities, no_new_privs and seccomp, as
 * /proc/self/task/TID/status shows them. libuprobe's threads must follow the program's. Modes:
 *   capset     drop every capability with capset (the program's own thread only)
 *   keepcaps   prctl(PR_SET_KEEPCAPS), setresuid to 65534 (glibc asks every thread), capset to get
 *              CAP_SETGID back on this thread only, setresgid to 65534 (every thread again), as
 *              setpriv does
 *   nnp        prctl(PR_SET_NO_NEW_PRIVS)
 *   seccomp    no_new_privs, then a seccomp filter (allow everything) with syscall(SYS_seccomp)
 *   rawuid     syscall(SYS_setresuid) to 65534: this thread only, no glibc broadcast
 * Prints "MODE: agree" when every thread says the same, else the first difference; then calls
 * work() 1000 times. Says how many threads there were on stderr. */
#define _GNU_SOURCE
#include <dirent.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noipa)) long work(long x) { return x * 5 + 3; }

static const char *fields[] = {"Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:",
                               "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:", NULL};

/* The lines of a thread's status that say what it may do. */
static void privileges(const char *tid, char *out, size_t len) {
  char path[64], line[512];
  snprintf(path, sizeof path, "/proc/self/task/%s/status", tid);
  out[0] = 0;
  FILE *f = fopen(path, "r");
  while (f && fgets(line, sizeof line, f))
    for (int i = 0; fields[i]; i++)
      if (!strncmp(line, fields[i], strlen(fields[i]))) strncat(out, line, len - strlen(out) - 1);
  if (f) fclose(f);
}

static int compare(const char *mode) {
  char first[4096] = "", mine[4096];
  int n = 0, same = 1;
  DIR *d = opendir("/proc/self/task");
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    privileges(e->d_name, mine, sizeof mine);
    if (!mine[0]) continue; /* a thread that ended meanwhile */
    if (!n++) {
      strcpy(first, mine);
    } else if (same && strcmp(first, mine)) {
      same = 0;
      printf("%s: thread %s differs:\n%s---\n%s", mode, e->d_name, first, mine);
    }
  }
  closedir(d);
  if (same) printf("%s: agree\n", mode);
  fprintf(stderr, "threads %d\n", n);
  return same;
}

static int set_caps(unsigned long long caps) {
  struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2] = {{(unsigned)caps, (unsigned)caps, 0},
                                           {(unsigned)(caps >> 32), (unsigned)(caps >> 32), 0}};
  return capset(&h, data);
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "capset";
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (!strcmp(mode, "capset")) {
    if (set_caps(0)) perror("capset");
  } else if (!strcmp(mode, "keepcaps")) {
    if (prctl(PR_SET_KEEPCAPS, 1)) perror("prctl");
    if (setresuid(65534, 65534, 65534)) perror("setresuid");
    if (set_caps(1ull << CAP_SETGID)) perror("capset");
    compare("keepcaps after capset");
    if (setresgid(65534, 65534, 65534)) perror("setresgid");
  } else if (!strcmp(mode, "nnp")) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) perror("prctl");
  } else if (!strcmp(mode, "seccomp")) {
    struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {1, allow};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) perror("prctl");
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) perror("seccomp");
  } else if (!strcmp(mode, "rawuid")) {
    if (syscall(SYS_setresuid, 65534, 65534, 65534)) perror("setresuid");
  }
  compare(mode);
  long s = 0;
  for (long i = 0; i < 1000; i++) s += work(i);
  printf("work %ld\n", s);
  return 0;
}
