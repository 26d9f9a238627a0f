/* Runs every case of zoo.S with known inputs and prints every register, RFLAGS, the stack pointer
 * delta, xmm0/xmm1 and the scratch memory afterwards. Addresses are printed relative to the zoo's
 * text, data or the stack, so that two runs (with and without probes) print the same bytes. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

struct regs { uint64_t r[15]; uint64_t flags; uint64_t rsp; };
extern struct regs zoo_in, zoo_out;
extern uint64_t zoo_saved_rsp;
extern unsigned char zoo_data[], zoo_mem[64], zoo_xmm_in[32], zoo_xmm_out[32];
extern unsigned char zoo_vec_in[2048], zoo_vec_out[2048], zoo_k_in[64], zoo_k_out[64];
extern unsigned char zoo_vec_level;
extern char zoo_text_start[], zoo_text_end[], __executable_start[], end[];

enum { RAX, RBX, RCX, RDX, RSI, RDI, RBP, R8, R9, R10, R11, R12, R13, R14, R15 };
static const char *reg_names[15] = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8",
                                    "r9",  "r10", "r11", "r12", "r13", "r14", "r15"};

#define CASES(X)                                                                                   \
  X(riprel_load) X(riprel_store) X(riprel_lea) X(riprel_cmp_imm) X(riprel_sse) X(riprel_sse_op)    \
  X(call_rel32) X(jmp_rel8) X(jmp_rel32) X(jl_rel32) X(loop) X(loopne) X(loope) X(jrcxz) X(ret)    \
  X(ret_imm16) X(call_reg) X(call_mem) X(call_stack_mem) X(call_riprel) X(jmp_reg) X(jmp_mem)      \
  X(jmp_riprel) X(push) X(pop) X(endbr64) X(lock_cmpxchg) X(lock_cmpxchg_riprel) X(rep_movsb)      \
  X(syscall) X(rsp_load)
#define JCC(X) X(jo) X(jno) X(jb) X(jae) X(je) X(jne) X(jbe) X(ja) X(js) X(jns) X(jp) X(jnp)      \
  X(jl) X(jge) X(jle) X(jg)
#define DECLARE(n) void zoo_##n(void);
CASES(DECLARE)
JCC(DECLARE)

static void reset(void) {
  for (int i = 0; i < 15; i++) zoo_in.r[i] = 0x1000 * (uint64_t)(i + 1) + (uint64_t)i;
  zoo_in.flags = 0x202;
  for (int i = 0; i < 64; i++) zoo_mem[i] = (unsigned char)(i * 7);
  for (int i = 0; i < 32; i++) zoo_xmm_in[i] = (unsigned char)(0xa0 + i);
  for (int i = 0; i < 2048; i++) zoo_vec_in[i] = (unsigned char)(i * 13 + 5);
  for (int i = 0; i < 64; i++) zoo_k_in[i] = (unsigned char)(i * 29 + 3);
  memset(zoo_vec_out, 0, sizeof zoo_vec_out);
  memset(zoo_k_out, 0, sizeof zoo_k_out);
}

/* FNV-1a of the saved vector state (and mask registers): one number a line. */
static uint64_t vec_hash(void) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int i = 0; i < 2048; i++) h = (h ^ zoo_vec_out[i]) * 0x100000001b3ull;
  for (int i = 0; i < 64; i++) h = (h ^ zoo_k_out[i]) * 0x100000001b3ull;
  return h;
}

static void print_value(const char *name, uint64_t v) {
  uint64_t text = (uint64_t)zoo_text_start, data = (uint64_t)zoo_data;
  if (v >= text && v < (uint64_t)zoo_text_end)
    printf(" %s=text+%lx", name, (unsigned long)(v - text));
  else if (v >= data && v < data + 512)
    printf(" %s=data+%lx", name, (unsigned long)(v - data));
  else if (v >= (uint64_t)__executable_start && v < (uint64_t)end)
    printf(" %s=exe+%lx", name, (unsigned long)(v - (uint64_t)__executable_start));
  else if (v + 8192 >= zoo_saved_rsp && v <= zoo_saved_rsp + 8192)
    printf(" %s=stack%+ld", name, (long)(v - zoo_saved_rsp));
  else
    printf(" %s=%lx", name, (unsigned long)v);
}

static void run(const char *name, void (*fn)(void), int variant) {
  fn();
  printf("%s/%d:", name, variant);
  for (int i = 0; i < 15; i++) print_value(reg_names[i], zoo_out.r[i]);
  printf(" flags=%lx rsp%+ld xmm=", (unsigned long)zoo_out.flags,
         (long)(zoo_out.rsp - zoo_saved_rsp));
  for (int i = 0; i < 32; i++) printf("%02x", zoo_xmm_out[i]);
  printf(" vec=%016llx mem=", (unsigned long long)vec_hash());
  for (int i = 0; i < 64; i++) printf("%02x", zoo_mem[i]);
  printf("\n");
}

/* Flag combinations: every subset of CF, PF, ZF, SF, OF. */
static uint64_t flag_combo(int k) {
  static const uint64_t bits[5] = {1u << 0, 1u << 2, 1u << 6, 1u << 7, 1u << 11};
  uint64_t f = 0x202;
  for (int b = 0; b < 5; b++)
    if (k & (1 << b)) f |= bits[b];
  return f;
}

int main(void) {
  uint64_t first_qword, second_qword;
  __builtin_cpu_init();
  zoo_vec_level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx") ? 1 : 0;
  fprintf(stderr, "zoo: vector state %s\n",
          zoo_vec_level == 2 ? "zmm0-31, k1-7" : zoo_vec_level == 1 ? "ymm0-15" : "xmm0-15");
#define SIMPLE(n) reset(); run(#n, zoo_##n, 0);
  SIMPLE(riprel_load) SIMPLE(riprel_store) SIMPLE(riprel_lea) SIMPLE(riprel_cmp_imm)
  SIMPLE(riprel_sse) SIMPLE(riprel_sse_op) SIMPLE(call_rel32) SIMPLE(jmp_rel8) SIMPLE(jmp_rel32)
  SIMPLE(ret) SIMPLE(ret_imm16) SIMPLE(call_reg) SIMPLE(call_mem) SIMPLE(call_stack_mem)
  SIMPLE(call_riprel) SIMPLE(jmp_reg) SIMPLE(jmp_mem) SIMPLE(jmp_riprel) SIMPLE(push) SIMPLE(pop)
  SIMPLE(endbr64) SIMPLE(rep_movsb) SIMPLE(syscall) SIMPLE(rsp_load)

#define ALL_FLAGS(n) for (int k = 0; k < 32; k++) { reset(); zoo_in.flags = flag_combo(k); run(#n, zoo_##n, k); }
  JCC(ALL_FLAGS)

  reset(); zoo_in.flags = 0x202 | (1u << 7); run("jl_rel32", zoo_jl_rel32, 0); /* SF != OF: taken */
  reset(); run("jl_rel32", zoo_jl_rel32, 1);                                  /* not taken */
  reset(); zoo_in.r[RCX] = 3; run("loop", zoo_loop, 0);                        /* loop runs 3 times */
  reset(); zoo_in.r[RAX] = 0; zoo_in.r[RDX] = 2; zoo_in.r[RCX] = 10;
  run("loopne", zoo_loopne, 0);                                               /* 2 times */
  reset(); zoo_in.r[RAX] = 5; zoo_in.r[RDX] = 5; zoo_in.r[RCX] = 4;
  run("loope", zoo_loope, 0);                                                 /* 4 times */
  reset(); zoo_in.r[RCX] = 0; run("jrcxz", zoo_jrcxz, 0);
  reset(); zoo_in.r[RCX] = 5; run("jrcxz", zoo_jrcxz, 1);

  reset(); memcpy(&first_qword, zoo_mem, 8); zoo_in.r[RAX] = first_qword;
  run("lock_cmpxchg", zoo_lock_cmpxchg, 0);                                   /* exchanges */
  reset(); run("lock_cmpxchg", zoo_lock_cmpxchg, 1);                           /* fails */
  reset(); memcpy(&second_qword, zoo_mem + 8, 8); zoo_in.r[RAX] = second_qword;
  run("lock_cmpxchg_riprel", zoo_lock_cmpxchg_riprel, 0);
  reset(); run("lock_cmpxchg_riprel", zoo_lock_cmpxchg_riprel, 1);
  return 0;
}
