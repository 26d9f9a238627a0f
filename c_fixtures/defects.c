/* One program, many modes, for what libuprobe must leave exactly as it was. `f` is the function
 * the tests probe. Usage: defects MODE [ARGS]; see each mode below. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

extern char **environ;
static volatile long calls;

__attribute__((noipa)) long f(long x) {
  calls++;
  return x + 1;
}

static void call_f(int n) {
  for (int i = 0; i < n; i++) f(i);
}

/* ids: drop privileges as a daemon does (needs root); setuid waits for every thread. */
static int mode_ids(void) {
  call_f(2);
  if (setgroups(0, NULL) || setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534)) {
    printf("ids: %s\n", strerror(errno));
    return 1;
  }
  call_f(3);
  printf("ids: uid %d euid %d gid %d\n", getuid(), geteuid(), getgid());
  return 0;
}

/* userns: unshare into a new user namespace (the process must be single-threaded). */
static int mode_userns(void) {
  call_f(1);
  int r = unshare(CLONE_NEWUSER);
  printf("userns: %s\n", r ? strerror(errno) : "ok");
  call_f(1);
  return r ? 1 : 0;
}

/* setns: join a user namespace made by a child. */
static int mode_setns(void) {
  int p[2];
  if (pipe(p)) return 1;
  pid_t c = fork();
  if (c == 0) {
    if (unshare(CLONE_NEWUSER)) _exit(2);
    if (write(p[1], "r", 1) != 1) _exit(3);
    pause();
    _exit(0);
  }
  char b;
  if (read(p[0], &b, 1) != 1) return 1;
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/ns/user", c);
  int fd = open(path, O_RDONLY);
  int r = setns(fd, CLONE_NEWUSER);
  printf("setns: %s\n", r ? strerror(errno) : "ok");
  kill(c, SIGKILL);
  waitpid(c, NULL, 0);
  call_f(1);
  return r ? 1 : 0;
}

/* orphan N: the parent exits at once; its child, reparented, calls f N times. */
static int mode_orphan(int n) {
  pid_t parent = getpid();
  pid_t c = fork();
  if (c) return 0;
  while (getppid() == parent) usleep(1000);
  call_f(n);
  printf("orphan: %d calls\n", n);
  return 0;
}

/* pidns N: the first child in a new pid namespace (its getppid() is 0) calls f N times. */
static int mode_pidns(int n) {
  if (unshare(CLONE_NEWPID)) {
    printf("pidns: %s\n", strerror(errno));
    return 1;
  }
  pid_t c = fork();
  if (c == 0) {
    call_f(n);
    printf("pidns: child pid %d ppid %d\n", getpid(), getppid());
    exit(0);
  }
  int st;
  waitpid(c, &st, 0);
  return WEXITSTATUS(st);
}

/* execfail: an exec that fails (ENOENT); the program goes on and answers on stdin. */
static int mode_execfail(void) {
  call_f(1);
  char *argv[] = {"x", NULL};
  execve("/nonexistent/program", argv, environ);
  printf("execfail: %s\n", strerror(errno));
  fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "quit", 4)) break;
    call_f(atoi(line));
    printf("done %d\n", atoi(line));
    fflush(stdout);
  }
  return 0;
}

/* masks MODE: a probed function runs while the program asked for SIGTRAP to be blocked. */
static volatile int handled;
static void on_usr1(int sig) {
  (void)sig;
  f(100);
  handled++;
}
static void on_usr1_ucmask(int sig, siginfo_t *si, void *ctx) {
  (void)sig;
  (void)si;
  sigfillset(&((ucontext_t *)ctx)->uc_sigmask);
  sigdelset(&((ucontext_t *)ctx)->uc_sigmask, SIGUSR1);
  handled++;
}
static ucontext_t main_ctx, co_ctx;
static void co_body(void) { f(200); }

static int mode_masks(const char *m) {
  struct sigaction sa = {0};
  sa.sa_handler = on_usr1;
  sigaction(SIGUSR1, &sa, NULL);
  sigset_t all, wait_set;
  sigfillset(&all);
  sigfillset(&wait_set);
  sigdelset(&wait_set, SIGUSR1); /* everything blocked but SIGUSR1, SIGTRAP included */
  sigprocmask(SIG_BLOCK, &all, NULL);
  raise(SIGUSR1); /* pending until a mask lets it in */
  if (!strcmp(m, "sigsuspend")) {
    sigsuspend(&wait_set);
  } else if (!strcmp(m, "ppoll")) {
    struct timespec t = {5, 0};
    ppoll(NULL, 0, &t, &wait_set);
  } else if (!strcmp(m, "pselect")) {
    struct timespec t = {5, 0};
    pselect(0, NULL, NULL, NULL, &t, &wait_set);
  } else if (!strcmp(m, "epoll")) {
    int ep = epoll_create1(0);
    struct epoll_event ev;
    epoll_pwait(ep, &ev, 1, 5000, &wait_set);
  } else if (!strcmp(m, "swapcontext")) {
    static char stack[65536];
    sigprocmask(SIG_UNBLOCK, &all, NULL); /* SIGUSR1 is delivered here */
    getcontext(&co_ctx);
    co_ctx.uc_stack.ss_sp = stack;
    co_ctx.uc_stack.ss_size = sizeof stack;
    co_ctx.uc_link = &main_ctx;
    sigfillset(&co_ctx.uc_sigmask); /* the coroutine runs with every signal blocked */
    makecontext(&co_ctx, co_body, 0);
    swapcontext(&main_ctx, &co_ctx);
  } else if (!strcmp(m, "ucmask")) {
    sa.sa_handler = NULL;
    sa.sa_sigaction = on_usr1_ucmask;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, SIGUSR1);
    sigprocmask(SIG_UNBLOCK, &only, NULL); /* the handler sets every signal blocked on return */
    f(300);
  } else {
    return 2;
  }
  f(1);
  sigset_t now;
  sigprocmask(SIG_BLOCK, NULL, &now);
  printf("masks %s: handled %d, calls %ld\n", m, handled, calls);
  return 0;
}

/* mprot LIB: pagef's page (it is alone there) is briefly not executable while a library is
 * loaded, as a hot-patcher would do. */
long pagef(long);
static int mode_mprot(const char *lib) {
  long s = pagef(1);
  long ps = sysconf(_SC_PAGESIZE);
  void *page = (void *)((uintptr_t)pagef & ~(uintptr_t)(ps - 1));
  mprotect(page, ps, PROT_READ | PROT_WRITE);
  void *h = dlopen(lib, RTLD_NOW);
  mprotect(page, ps, PROT_READ | PROT_EXEC);
  s += pagef(2);
  printf("mprot: %s, %ld\n", h ? "loaded" : dlerror(), s);
  return 0;
}

/* ifunc LIB N: a library with an IFUNC is loaded late; its function called N times. */
static int mode_ifunc(const char *lib, int n) {
  void *h = dlopen(lib, RTLD_NOW);
  if (!h) {
    printf("ifunc: %s\n", dlerror());
    return 1;
  }
  long (*pick)(long) = (long (*)(long))dlsym(h, "pick");
  long s = 0;
  for (int i = 0; i < n; i++) s += pick(i);
  printf("ifunc: %ld\n", s);
  return 0;
}

/* hold LIB: load LIB and call its lib_add as told on stdin ("call N", "quit"). */
static int mode_hold(const char *lib) {
  void *h = dlopen(lib, RTLD_NOW);
  if (!h) {
    printf("hold: %s\n", dlerror());
    return 1;
  }
  int (*add)(int, int) = (int (*)(int, int))dlsym(h, "lib_add");
  printf("ready\n");
  fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "quit", 4)) break;
    int n = atoi(line + 5), s = 0;
    for (int i = 0; i < n; i++) s += add(i, 1);
    printf("done %d %d\n", n, s);
    fflush(stdout);
  }
  return 0;
}

/* churn LIB: a thread loads and unloads LIB in a loop until stdin says "quit". */
static volatile int stop;
static const char *churn_lib;
static long churned;
static void *churner(void *arg) {
  (void)arg;
  while (!stop) {
    void *h = dlopen(churn_lib, RTLD_NOW);
    if (h) dlclose(h);
    churned++;
  }
  return NULL;
}
/* A background thread runs `body` until stdin says "quit"; then "NAME: ok" if `done` moved. */
static int until_quit(void *(*body)(void *), const char *name, volatile long *done) {
  pthread_t t;
  pthread_create(&t, NULL, body, NULL);
  printf("ready\n");
  fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin) && strncmp(line, "quit", 4)) {
  }
  stop = 1;
  pthread_join(t, NULL);
  printf("%s: %s\n", name, *done > 0 ? "ok" : "none");
  return 0;
}
static int mode_churn(const char *lib) {
  churn_lib = lib;
  return until_quit(churner, "churn", &churned);
}

/* threadloop: a thread starts and joins short threads in a loop (each new thread runs glibc's
 * start with every signal blocked) until stdin says "quit"; prints how many. */
static long started;
static void *short_lived(void *arg) { return arg; }
static void *starter(void *arg) {
  (void)arg;
  while (!stop) {
    pthread_t t;
    if (pthread_create(&t, NULL, short_lived, NULL) == 0) {
      pthread_join(t, NULL);
      started++;
    }
  }
  return NULL;
}
static int mode_threadloop(void) { return until_quit(starter, "threadloop", &started); }

/* spawn MODE PROGRAM: posix_spawn variants whose child runs glibc code with every signal blocked. */
static int mode_spawn(const char *m, const char *prog) {
  pid_t pid;
  int r, st = 0;
  char *argv[] = {(char *)prog, NULL};
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&at);
  if (!strcmp(m, "fa")) {
    posix_spawn_file_actions_addopen(&fa, 3, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addclose(&fa, 3);
    r = posix_spawnp(&pid, prog, &fa, &at, argv, environ);
  } else if (!strcmp(m, "resetids")) {
    posix_spawnattr_setflags(&at, POSIX_SPAWN_RESETIDS | POSIX_SPAWN_SETSIGDEF);
    sigset_t all;
    sigfillset(&all);
    posix_spawnattr_setsigdefault(&at, &all);
    r = posix_spawnp(&pid, prog, &fa, &at, argv, environ);
  } else if (!strcmp(m, "noexec")) {
    r = posix_spawn(&pid, prog, &fa, &at, argv, environ);
  } else if (!strcmp(m, "system")) {
    st = system(prog);
    printf("spawn %s: status %#x\n", m, st);
    return 0;
  } else {
    return 2;
  }
  if (r == 0) waitpid(pid, &st, 0);
  f(1);
  printf("spawn %s: %s, status %#x\n", m, r ? strerror(r) : "ok", st);
  return 0;
}

long call_ret16(long a, long b);

/* coro: a coroutine suspended inside co_f on the main thread is resumed, and returns, on another
 * thread. */
static ucontext_t co_main_ctx, co_a_ctx, co_b_ctx;
static ucontext_t *co_return_to;
__attribute__((noipa)) long co_f(long x) {
  swapcontext(&co_a_ctx, &co_main_ctx);
  return x + 1;
}
static long co_result;
static void co_entry(void) {
  co_result = co_f(41);
  setcontext(co_return_to);
}
static void *co_thread(void *arg) {
  (void)arg;
  co_return_to = &co_b_ctx;
  swapcontext(&co_b_ctx, &co_a_ctx);
  return NULL;
}
static int mode_coro(void) {
  static char stack[65536];
  getcontext(&co_a_ctx);
  co_a_ctx.uc_stack.ss_sp = stack;
  co_a_ctx.uc_stack.ss_size = sizeof stack;
  co_a_ctx.uc_link = &co_main_ctx;
  makecontext(&co_a_ctx, co_entry, 0);
  swapcontext(&co_main_ctx, &co_a_ctx); /* runs until co_f suspends */
  pthread_t t;
  pthread_create(&t, NULL, co_thread, NULL); /* resumes co_f there: it returns there */
  pthread_join(t, NULL);
  printf("coro: %ld\n", co_result);
  return 0;
}

/* lostret: a return into the return trampoline that no call was hijacked for (what a stack
 * switch libuprobe cannot see looks like): libuprobe stops the program, saying why. */
static void *grabbed;
__attribute__((noipa)) long grab(long x) {
  grabbed = __builtin_return_address(0);
  return x;
}
static int mode_lostret(void) {
  grab(1);
  printf("lostret: %s\n", grabbed == (void *)mode_lostret ? "?" : "returning into it");
  fflush(stdout);
  fprintf(stderr, "progress: 50%%"); /* a line not finished yet */
  ((void (*)(void))grabbed)();
  printf("lostret: returned\n");
  return 0;
}

/* exits: images that end with _exit, without exit handlers (as every shell does): 3 vfork
 * children that _exit(1) at once, a fork child that calls f 4 times and _exit(2)s, then the
 * parent calls f 5 times and ends by _exit(3) in a SIGTERM handler that interrupts a loop of
 * malloc and free (or, with "main", by _Exit(3) from main). */
static void on_term(int sig) {
  (void)sig;
  printf("exits: parent %ld calls\n", calls);
  fflush(stdout);
  _exit(3);
}
static int mode_exits(const char *how) {
  for (int i = 0; i < 3; i++) {
    pid_t p = vfork();
    if (p == 0) _exit(1);
    waitpid(p, NULL, 0);
  }
  pid_t p = fork();
  if (p == 0) {
    call_f(4);
    _exit(2);
  }
  int st = 0;
  waitpid(p, &st, 0);
  printf("exits: child status %d\n", WEXITSTATUS(st));
  fflush(stdout);
  call_f(5);
  if (!strcmp(how, "main")) {
    printf("exits: parent %ld calls\n", calls);
    fflush(stdout);
    _Exit(3);
  }
  signal(SIGTERM, on_term);
  for (long i = 0;; i++) {
    free(malloc(64 + (size_t)(i % 512)));
    if (i == 200000) kill(getpid(), SIGTERM);
  }
}

int main(int argc, char **argv) {
  const char *m = argc > 1 ? argv[1] : "";
  const char *a = argc > 2 ? argv[2] : "";
  if (!strcmp(m, "ids")) return mode_ids();
  if (!strcmp(m, "userns")) return mode_userns();
  if (!strcmp(m, "setns")) return mode_setns();
  if (!strcmp(m, "orphan")) return mode_orphan(atoi(a));
  if (!strcmp(m, "pidns")) return mode_pidns(atoi(a));
  if (!strcmp(m, "execfail")) return mode_execfail();
  if (!strcmp(m, "exits")) return mode_exits(a);
  if (!strcmp(m, "masks")) return mode_masks(a);
  if (!strcmp(m, "mprot")) return mode_mprot(a);
  if (!strcmp(m, "ifunc")) return mode_ifunc(a, argc > 3 ? atoi(argv[3]) : 0);
  if (!strcmp(m, "hold")) return mode_hold(a);
  if (!strcmp(m, "churn")) return mode_churn(a);
  if (!strcmp(m, "threadloop")) return mode_threadloop();
  if (!strcmp(m, "spawn")) return mode_spawn(a, argc > 3 ? argv[3] : "/bin/true");
  if (!strcmp(m, "zlib")) {
    void *h = dlopen("libz.so.1", RTLD_NOW);
    unsigned long (*crc)(unsigned long, const unsigned char *, size_t) =
        h ? (unsigned long (*)(unsigned long, const unsigned char *, size_t))dlsym(h, "crc32_z") : NULL;
    if (!crc) {
      printf("zlib: %s\n", dlerror());
      return 1;
    }
    unsigned char buf[4096];
    for (int i = 0; i < (int)sizeof buf; i++) buf[i] = (unsigned char)(i * 31);
    unsigned long c = 0;
    for (int i = 0; i < atoi(a); i++) c = crc(c, buf, sizeof buf - (size_t)i);
    printf("zlib: %#lx\n", c);
    return 0;
  }
  if (!strcmp(m, "rtldnext")) {
    void *p = dlsym(RTLD_NEXT, "malloc");
    printf("rtldnext: %s\n", p ? "found malloc" : dlerror());
    return 0;
  }
  if (!strcmp(m, "coro")) return mode_coro();
  if (!strcmp(m, "lostret")) return mode_lostret();
  if (!strcmp(m, "ret16")) {
    long s = 0;
    for (int i = 0; i < atoi(a); i++) s += call_ret16(i, 1);
    printf("ret16: %ld\n", s);
    return 0;
  }
  if (!strcmp(m, "calls")) {
    call_f(atoi(a));
    printf("calls: %ld\n", calls);
    return 0;
  }
  fprintf(stderr, "defects: unknown mode %s\n", m);
  return 2;
}
