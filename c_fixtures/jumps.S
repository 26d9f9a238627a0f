/* Functions whose first instruction decides the jump path's site class (tests/jumps.rs). Each
 * takes a long in rdi and returns a long in rax. */
        .intel_syntax noprefix
        .text

        .macro FN name
        .globl \name
        .type \name, @function
        .p2align 4
\name:
        .endm

/* Class 1: the first instruction is 5 bytes or longer. */
FN j_long
        mov eax, 0x10                   /* 5 bytes */
        add rax, rdi
        ret

/* The site the churn test adds and removes, 5 bytes into j_hot (both instructions 5+ bytes). */
FN j_hot
        mov eax, 0x11                   /* 5 bytes */
        .globl j_hot_second
j_hot_second:
        add eax, 0x22                   /* 5 bytes: 05 imm32 */
        add rax, rdi
        ret

/* Class 2: a 2-byte first instruction (push r15). */
FN j_short
        push r15
        lea rax, [rdi + 3]
        pop r15
        ret

/* A leading endbr64: the punned jump goes over its 4 bytes only. */
FN j_endbr
        endbr64
        lea rax, [rdi + 4]
        ret

/* A 1-byte first instruction (push rbp): punned, or a trap where its target is taken. */
FN j_push
        push rbp
        mov rbp, rsp
        lea rax, [rdi + 5]
        pop rbp
        ret

/* A loop that jumps back to the instruction right after the probed one: only the probed
 * instruction changes, so the loop runs the original bytes and entries count once a call. */
FN j_back
        push rbx
        .globl j_back_loop
j_back_loop:
        dec rdi
        jg j_back_loop
        lea rax, [rdi + 50]
        pop rbx
        ret

/* A jump table: an indirect jump whose targets are inside the function. */
FN j_table
        mov rax, rdi
        and eax, 3
        lea rcx, [rip + .Ltable]
        movsxd rdx, dword ptr [rcx + rax * 4]
        add rdx, rcx
        jmp rdx
.Lcase0: mov eax, 100
        ret
.Lcase1: mov eax, 101
        ret
.Lcase2: mov eax, 102
        ret
.Lcase3: mov eax, 103
        ret
        .section .rodata
        .p2align 2
.Ltable:
        .long .Lcase0 - .Ltable, .Lcase1 - .Ltable, .Lcase2 - .Ltable, .Lcase3 - .Ltable
        .text

/* Class 1 sites whose instruction is control flow or RIP-relative. */
FN j_call
        call j_callee                   /* 5 bytes */
        add rax, rdi
        ret
FN j_callee
        mov eax, 7
        ret
FN j_jmp
        .byte 0xe9                      /* jmp rel32 (an assembler would pick rel8 here) */
        .long j_callee - 1f
1:
FN j_jcc
        test rdi, rdi
        .globl j_jcc_insn
j_jcc_insn:
        .byte 0x0f, 0x85                /* jne rel32 (6 bytes) */
        .long 2f - 1f
1:      mov eax, 1
        ret
2:      mov eax, 2
        ret
FN j_riprel
        mov rax, qword ptr [rip + j_value]   /* 7 bytes */
        add rax, rdi
        ret
FN j_nop5
        .byte 0x0f, 0x1f, 0x44, 0x00, 0x00   /* nop dword ptr [rax + rax + 0]: the kernel's nop5 */
        lea rax, [rdi + 9]
        ret

        .data
        .p2align 3
j_value: .quad 1000

        .section .note.GNU-stack, "", @progbits
