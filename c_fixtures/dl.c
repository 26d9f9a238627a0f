/* Objects that appear and vanish after start. Usage: dl MODE LIB N [ARGS]
 *   late    dlopen(LIB), lib_add N times                                  lib_add: N
 *   reopen  dlopen, lib_add N, dlclose, dlopen again, lib_add N           lib_add: 2N
 *   twice   dlopen(LIB) and dlmopen(LM_ID_NEWLM, LIB) and dlopen(LINK), a hard link to LIB
 *           made by the test: lib_add N times through each                lib_add: 3N
 *   mmap    mmap the whole file LIB with PROT_EXEC itself (no loader), call lib_add at file
 *           offset ARGS[0] N times                                        lib_add: N
 *   libc    iconv_open("ISO-8859-2", "UTF-8"): libc loads the gconv module ISO8859-2.so itself
 *           (__libc_dlopen, not dlopen) and runs its gconv_init; then N conversions of one
 *           character each                                   gconv_init: 1, gconv: N (+1 on close)
 * Prints one line with a checksum and exits 0. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <iconv.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int (*add_fn)(int, int);

static long call_n(void *handle, long n) {
  if (!handle) {
    fprintf(stderr, "dl: %s\n", dlerror());
    exit(2);
  }
  add_fn add = (add_fn)dlsym(handle, "lib_add");
  long s = 0;
  for (long i = 0; i < n; i++) s += add((int)i, 1);
  return s;
}

int main(int argc, char **argv) {
  if (argc < 4) return 2;
  const char *mode = argv[1], *lib = argv[2];
  long n = atol(argv[3]), s = 0;
  if (!strcmp(mode, "late")) {
    s = call_n(dlopen(lib, RTLD_NOW), n);
  } else if (!strcmp(mode, "reopen")) {
    void *h = dlopen(lib, RTLD_NOW);
    s = call_n(h, n);
    dlclose(h);
    s += call_n(dlopen(lib, RTLD_NOW), n);
  } else if (!strcmp(mode, "twice")) {
    s = call_n(dlopen(lib, RTLD_NOW), n);
    s += call_n(dlmopen(LM_ID_NEWLM, lib, RTLD_NOW), n);
    s += call_n(dlopen(argv[4], RTLD_NOW), n);
  } else if (!strcmp(mode, "mmap")) {
    int fd = open(lib, O_RDONLY);
    struct stat st;
    fstat(fd, &st);
    char *base = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    close(fd);
    add_fn add = (add_fn)(base + strtol(argv[4], NULL, 0));
    for (long i = 0; i < n; i++) s += add((int)i, 1);
    munmap(base, st.st_size);
  } else if (!strcmp(mode, "libc")) {
    iconv_t cd = iconv_open("ISO-8859-2", "UTF-8");
    if (cd == (iconv_t)-1) return 3;
    for (long i = 0; i < n; i++) {
      char in[] = "\xc5\x82", out[8]; /* U+0142, l with stroke: 0xb3 in ISO-8859-2 */
      char *ip = in, *op = out;
      size_t il = 2, ol = sizeof out;
      if (iconv(cd, &ip, &il, &op, &ol) == (size_t)-1) return 4;
      s += (unsigned char)out[0];
    }
    iconv_close(cd);
  } else {
    return 2;
  }
  printf("dl %s: %ld\n", mode, s);
  return 0;
}
