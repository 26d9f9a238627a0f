/* The instruction zoo: one function per instruction class. Each function loads every general
 * register and RFLAGS from zoo_in (and xmm0/xmm1 from zoo_xmm_in), runs a few instructions around
 * the probed one (labelled zp_<case>), and stores every register, RFLAGS and the stack pointer to
 * zoo_out (xmm0/xmm1 to zoo_xmm_out). zoo_main.c prints the results; the tests compare them with
 * and without a probe on every zp_ label, and check each label's exact hit count. */

        .intel_syntax noprefix

/* The whole vector state the CPU has, loaded before each case and saved after it (zoo_vec_level,
 * set by zoo_main.c: 0 xmm0-15, 1 ymm0-15, 2 zmm0-31 and k1-k7): what runs a probe must leave
 * every bit of it, upper halves included. */
        .macro LOAD_VEC
        cmp byte ptr [rip + zoo_vec_level], 1
        jb .Lload_xmm\@
        je .Lload_ymm\@
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        vmovdqu64 zmm\n, [rip + zoo_vec_in + \n * 64]
        .endr
        .irp n, 1,2,3,4,5,6,7
        kmovq k\n, [rip + zoo_k_in + \n * 8]
        .endr
        jmp .Lloaded\@
.Lload_ymm\@:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        vmovdqu ymm\n, [rip + zoo_vec_in + \n * 64]
        .endr
        jmp .Lloaded\@
.Lload_xmm\@:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        movdqu xmm\n, [rip + zoo_vec_in + \n * 64]
        .endr
.Lloaded\@:
        .endm

        .macro SAVE_VEC
        cmp byte ptr [rip + zoo_vec_level], 1
        jb .Lsave_xmm\@
        je .Lsave_ymm\@
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        vmovdqu64 [rip + zoo_vec_out + \n * 64], zmm\n
        .endr
        .irp n, 1,2,3,4,5,6,7
        kmovq [rip + zoo_k_out + \n * 8], k\n
        .endr
        jmp .Lsaved\@
.Lsave_ymm\@:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        vmovdqu [rip + zoo_vec_out + \n * 64], ymm\n
        .endr
        jmp .Lsaved\@
.Lsave_xmm\@:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        movdqu [rip + zoo_vec_out + \n * 64], xmm\n
        .endr
.Lsaved\@:
        .endm

/* struct regs: rax rbx rcx rdx rsi rdi rbp r8..r15 at 0..112, flags at 120, rsp at 128 */
        .macro LOAD_ALL
        push rbx
        push rbp
        push r12
        push r13
        push r14
        push r15
        mov [rip + zoo_saved_rsp], rsp
        LOAD_VEC
        movdqu xmm0, [rip + zoo_xmm_in]
        movdqu xmm1, [rip + zoo_xmm_in + 16]
        push qword ptr [rip + zoo_in + 120]
        popfq
        mov rax, [rip + zoo_in + 0]
        mov rbx, [rip + zoo_in + 8]
        mov rcx, [rip + zoo_in + 16]
        mov rdx, [rip + zoo_in + 24]
        mov rsi, [rip + zoo_in + 32]
        mov rdi, [rip + zoo_in + 40]
        mov rbp, [rip + zoo_in + 48]
        mov r8,  [rip + zoo_in + 56]
        mov r9,  [rip + zoo_in + 64]
        mov r10, [rip + zoo_in + 72]
        mov r11, [rip + zoo_in + 80]
        mov r12, [rip + zoo_in + 88]
        mov r13, [rip + zoo_in + 96]
        mov r14, [rip + zoo_in + 104]
        mov r15, [rip + zoo_in + 112]
        .endm

        .macro SAVE_ALL
        mov [rip + zoo_out + 128], rsp
        mov [rip + zoo_out + 0], rax
        mov [rip + zoo_out + 8], rbx
        mov [rip + zoo_out + 16], rcx
        mov [rip + zoo_out + 24], rdx
        mov [rip + zoo_out + 32], rsi
        mov [rip + zoo_out + 40], rdi
        mov [rip + zoo_out + 48], rbp
        mov [rip + zoo_out + 56], r8
        mov [rip + zoo_out + 64], r9
        mov [rip + zoo_out + 72], r10
        mov [rip + zoo_out + 80], r11
        mov [rip + zoo_out + 88], r12
        mov [rip + zoo_out + 96], r13
        mov [rip + zoo_out + 104], r14
        mov [rip + zoo_out + 112], r15
        movdqu [rip + zoo_xmm_out], xmm0
        movdqu [rip + zoo_xmm_out + 16], xmm1
        mov rsp, [rip + zoo_saved_rsp]
        pushfq
        pop qword ptr [rip + zoo_out + 120]
        SAVE_VEC
        pop r15
        pop r14
        pop r13
        pop r12
        pop rbp
        pop rbx
        ret
        .endm

        .macro CASE name
        .globl zoo_\name
        .type zoo_\name, @function
        .p2align 4
zoo_\name:
        LOAD_ALL
        .endm

        .macro PROBE name
        .globl zp_\name
        .type zp_\name, @function
zp_\name:
        .endm

        .text
        .globl zoo_text_start
zoo_text_start:

/* RIP-relative operands: re-encoded for the XOL slot. */
CASE riprel_load
PROBE riprel_load
        mov rax, [rip + zoo_data]
        SAVE_ALL

CASE riprel_store
PROBE riprel_store
        mov [rip + zoo_mem], rbx
        SAVE_ALL

CASE riprel_lea
PROBE riprel_lea
        lea rcx, [rip + zoo_data + 8]
        SAVE_ALL

CASE riprel_cmp_imm
PROBE riprel_cmp_imm
        cmp dword ptr [rip + zoo_data], 0x12345678
        SAVE_ALL

CASE riprel_sse
PROBE riprel_sse
        movdqu xmm0, [rip + zoo_data + 16]
        SAVE_ALL

CASE riprel_sse_op
PROBE riprel_sse_op
        paddd xmm1, [rip + zoo_data + 32]
        SAVE_ALL

/* Direct calls and jumps: emulated. */
CASE call_rel32
PROBE call_rel32
        call zoo_callee
        SAVE_ALL

CASE jmp_rel8
PROBE jmp_rel8
        jmp 1f
        mov rax, 0xdead
1:      SAVE_ALL

CASE jmp_rel32
PROBE jmp_rel32
        .byte 0xe9
        .long 2f - 1f
1:      mov rax, 0xdead
2:      SAVE_ALL

/* Every condition, short and near; zoo_main.c runs each with 32 flag combinations. */
        .irp cc, o,no,b,ae,e,ne,be,a,s,ns,p,np,l,ge,le,g
CASE j\cc
PROBE j\cc
        j\cc 1f
        mov rdx, 0x1111
1:      SAVE_ALL
        .endr

CASE jl_rel32
PROBE jl_rel32
        .byte 0x0f, 0x8c
        .long 2f - 1f
1:      mov rdx, 0x2222
2:      SAVE_ALL

/* loop: rcx counts down from its input; the probed loop runs rcx times. */
CASE loop
1:      add rax, 1
PROBE loop
        loop 1b
        SAVE_ALL

CASE loopne
1:      add rax, 1
        cmp rax, rdx
PROBE loopne
        loopne 1b
        SAVE_ALL

CASE loope
1:      add rax, 0
        cmp rax, rdx
PROBE loope
        loope 1b
        SAVE_ALL

CASE jrcxz
PROBE jrcxz
        jrcxz 1f
        mov rdx, 0x3333
1:      SAVE_ALL

/* Returns. */
CASE ret
        call zoo_ret_helper
        SAVE_ALL

CASE ret_imm16
        push 0x11
        push 0x22
        call zoo_ret16_helper
        SAVE_ALL

/* Indirect calls and jumps through a register, memory, RIP-relative memory. */
CASE call_reg
        lea r11, [rip + zoo_callee]
PROBE call_reg
        call r11
        SAVE_ALL

CASE call_mem
        lea r12, [rip + zoo_fnptrs]
        mov rcx, 1
PROBE call_mem
        call qword ptr [r12 + rcx * 8]
        SAVE_ALL

CASE call_stack_mem
        lea r11, [rip + zoo_callee]
        push r11
PROBE call_stack_mem
        call qword ptr [rsp]
        pop r11
        SAVE_ALL

CASE call_riprel
PROBE call_riprel
        call qword ptr [rip + zoo_fnptrs + 8]
        SAVE_ALL

CASE jmp_reg
        lea r11, [rip + 1f]
PROBE jmp_reg
        jmp r11
        mov rax, 0xdead
1:      SAVE_ALL

CASE jmp_mem
        lea r12, [rip + zoo_jmp_targets]
PROBE jmp_mem
        jmp qword ptr [r12]
        mov rax, 0xdead
        .globl zoo_jmp_mem_target
zoo_jmp_mem_target:
        SAVE_ALL

CASE jmp_riprel
PROBE jmp_riprel
        jmp qword ptr [rip + zoo_jmp_targets + 8]
        mov rax, 0xdead
        .globl zoo_jmp_riprel_target
zoo_jmp_riprel_target:
        SAVE_ALL

/* Stack, CET, atomics, strings, system calls. */
CASE push
PROBE push
        push rbx
        pop rcx
        SAVE_ALL

CASE pop
        push rbx
PROBE pop
        pop rcx
        SAVE_ALL

CASE endbr64
PROBE endbr64
        endbr64
        SAVE_ALL

CASE lock_cmpxchg
        lea rdi, [rip + zoo_mem]
PROBE lock_cmpxchg
        lock cmpxchg [rdi], rcx
        SAVE_ALL

CASE lock_cmpxchg_riprel
PROBE lock_cmpxchg_riprel
        lock cmpxchg [rip + zoo_mem + 8], rcx
        SAVE_ALL

CASE rep_movsb
        lea rsi, [rip + zoo_data]
        lea rdi, [rip + zoo_mem + 16]
        mov rcx, 24
PROBE rep_movsb
        rep movsb
        SAVE_ALL

CASE syscall
        mov eax, 102                    /* getuid */
PROBE syscall
        syscall
        SAVE_ALL

CASE rsp_load
PROBE rsp_load
        mov rax, [rsp + 8]
        SAVE_ALL

/* Helpers. */
        .type zoo_callee, @function
zoo_callee:
        lea rax, [rax + 1]
        mov rdx, [rsp]                  /* the return address the call pushed */
        ret

zoo_ret_helper:
        mov rsi, [rsp]
PROBE ret
        ret

zoo_ret16_helper:
        mov rsi, [rsp + 8]
PROBE ret_imm16
        ret 16

        .globl zoo_text_end
zoo_text_end:

        .data
        .p2align 4
        .globl zoo_data
zoo_data:
        .quad 0x0123456789abcdef, 0x1122334455667788
        .quad 0x0f0e0d0c0b0a0908, 0x0706050403020100
        .long 1, 2, 3, 4
        .quad 0xdeadbeefcafebabe, 0x5555aaaa5555aaaa
        .globl zoo_mem
zoo_mem:
        .zero 64
zoo_fnptrs:
        .quad 0, zoo_callee
zoo_jmp_targets:
        .quad zoo_jmp_mem_target, zoo_jmp_riprel_target
        .globl zoo_in, zoo_out, zoo_saved_rsp, zoo_xmm_in, zoo_xmm_out
        .p2align 4
zoo_in:         .zero 136
zoo_out:        .zero 136
zoo_saved_rsp:  .quad 0
        .p2align 4
zoo_xmm_in:     .zero 32
zoo_xmm_out:    .zero 32
        .globl zoo_vec_in, zoo_vec_out, zoo_k_in, zoo_k_out, zoo_vec_level
        .p2align 6
zoo_vec_in:     .zero 2048
zoo_vec_out:    .zero 2048
zoo_k_in:       .zero 64
zoo_k_out:      .zero 64
zoo_vec_level:  .byte 0

        .section .note.GNU-stack,"",@progbits
