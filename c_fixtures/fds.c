/* What a program does with descriptors, for tests/defects.rs (libuprobe's must never be numbers the
 * program expects, nor be used once the program has taken them back). Driven by lines on stdin,
 * each answered on stdout:
 *   first      the number its first open() gets ("first 3")
 *   daemon     close_range(3, ~0), as daemons do, then a pipe and a TCP connection on loopback that
 *              must carry 16 bytes each untouched after a pause ("daemon pipe 16 tcp 16")
 *   squat      dup2 a file of its own over every descriptor of 20 or above that is a socket or an
 *              eventfd (libuprobe's), pause, and say whether anyone read it ("squat offset 0");
 *              how many it took goes to stderr
 *   call N     call target() N times ("done N")
 *   quit       exit 0 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

__attribute__((noipa)) long target(long x) { return x + 1; }

static int carry(int w, int r) {
  char out[16] = "0123456789abcdef", in[16];
  if (write(w, out, 16) != 16) return -1;
  usleep(300000); /* a reader that should not be there has time to take some */
  int n = 0;
  while (n < 16) {
    int k = read(r, in + n, 16 - n);
    if (k <= 0) break;
    n += k;
  }
  return n == 16 && !memcmp(in, out, 16) ? 16 : n;
}

int main(void) {
  char line[256];
  setvbuf(stdout, NULL, _IOLBF, 0);
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "first", 5)) {
      int fd = open("/dev/null", O_RDONLY);
      printf("first %d\n", fd);
      close(fd);
    } else if (!strncmp(line, "daemon", 6)) {
      close_range(3, ~0U, 0);
      int p[2];
      if (pipe(p)) return 1;
      int piped = carry(p[1], p[0]);
      int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0);
      struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
      socklen_t len = sizeof a;
      if (bind(l, (void *)&a, sizeof a) || listen(l, 4) || getsockname(l, (void *)&a, &len) ||
          connect(c, (void *)&a, sizeof a))
        return 2;
      int s = accept(l, NULL, NULL);
      printf("daemon pipe %d tcp %d\n", piped, carry(c, s));
      close(s), close(c), close(l), close(p[0]), close(p[1]);
    } else if (!strncmp(line, "squat", 5)) {
      char path[] = "/tmp/uprobe-fds-XXXXXX";
      int file = mkstemp(path), n = 0;
      unlink(path);
      if (write(file, "data", 4) != 4 || lseek(file, 0, SEEK_SET)) return 3;
      for (int fd = 20; fd < 4096; fd++) {
        char link[64], what[128];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t k = readlink(link, what, sizeof what - 1);
        if (k <= 0) continue;
        what[k] = 0;
        if (strncmp(what, "socket:", 7) && strcmp(what, "anon_inode:[eventfd]")) continue;
        dup2(file, fd);
        n++;
      }
      /* Longer than the server's poll: a poll in flight keeps the files it had. */
      usleep(2500000);
      fprintf(stderr, "squatted %d\n", n);
      printf("squat offset %ld\n", (long)lseek(file, 0, SEEK_CUR));
    } else if (!strncmp(line, "call ", 5)) {
      long n = atol(line + 5), s = 0;
      for (long i = 0; i < n; i++) s += target(i);
      printf("done %ld\n", n);
    } else if (!strncmp(line, "quit", 4)) {
      return 0;
    }
  }
  return 0;
}
