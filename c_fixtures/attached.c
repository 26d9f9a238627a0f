/* A program that is already running when libuprobe comes (tests/attach.rs): a worker calls
 * lib_add (libcounted.so) in a loop; one thread sleeps in nanosleep, one is blocked in read on a
 * pipe, one in poll on another; each records any EINTR it sees. Orders on stdin, one a line:
 *   pause / resume   the worker stops between two calls (answers "paused N") / goes on
 *   count            the worker's calls so far
 *   send             a line into the pipe the reader reads
 *   quit             stop, then print what the reader read and whether anyone saw EINTR
 * Prints "ready" first. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int lib_add(int, int);

static atomic_long calls;
static atomic_int stop, pause_req, paused, eintr;
static int pipe_read[2], pipe_poll[2];
static char got[4096];
static size_t got_len;

static void *worker(void *arg) {
  (void)arg;
  long sum = 0;
  while (!stop) {
    if (pause_req) {
      paused = 1;
      while (pause_req && !stop) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
      }
      paused = 0;
      continue;
    }
    sum += lib_add((int)calls, 1);
    calls++;
  }
  return (void *)sum;
}

static void *sleeper(void *arg) {
  (void)arg;
  while (!stop) {
    struct timespec ts = {0, 50 * 1000000};
    if (nanosleep(&ts, NULL) != 0 && errno == EINTR) eintr |= 1;
  }
  return NULL;
}

static void *reader(void *arg) {
  (void)arg;
  for (;;) {
    ssize_t n = read(pipe_read[0], got + got_len, sizeof got - got_len - 1);
    if (n < 0 && errno == EINTR) {
      eintr |= 2;
      continue;
    }
    if (n <= 0) break;
    got_len += (size_t)n;
  }
  return NULL;
}

static void *poller(void *arg) {
  (void)arg;
  while (!stop) {
    struct pollfd p = {pipe_poll[0], POLLIN, 0};
    if (poll(&p, 1, 200) < 0 && errno == EINTR) eintr |= 4;
  }
  return NULL;
}

int main(void) {
  pipe(pipe_read);
  pipe(pipe_poll);
  pthread_t t[4];
  pthread_create(&t[0], NULL, worker, NULL);
  pthread_create(&t[1], NULL, sleeper, NULL);
  pthread_create(&t[2], NULL, reader, NULL);
  pthread_create(&t[3], NULL, poller, NULL);
  printf("ready\n");
  fflush(stdout);
  char line[64];
  int sent = 0;
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "pause", 5)) {
      pause_req = 1;
      while (!paused) {
      }
      printf("paused %ld\n", (long)calls);
    } else if (!strncmp(line, "resume", 6)) {
      pause_req = 0;
      printf("resumed\n");
    } else if (!strncmp(line, "count", 5)) {
      printf("calls %ld\n", (long)calls);
    } else if (!strncmp(line, "send", 4)) {
      char msg[32];
      int n = snprintf(msg, sizeof msg, "message %d\n", ++sent);
      write(pipe_read[1], msg, (size_t)n);
      printf("sent %d\n", sent);
    } else if (!strncmp(line, "quit", 4)) {
      break;
    }
    fflush(stdout);
  }
  stop = 1;
  pause_req = 0;
  close(pipe_read[1]);
  for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
  got[got_len] = 0;
  printf("reader got:\n%s", got);
  printf("EINTR seen: %s\n", eintr ? "yes" : "no");
  return 3;
}
