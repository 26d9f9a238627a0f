/* Instructions that fault, for faults_main.c: a displaced instruction that faults (out of line
 * or emulated) must be shown to the program's handler at its own address, as without a probe. */

        .intel_syntax noprefix
        .text

        .macro FN name
        .globl \name
        .type \name, @function
\name:
        .endm

FN fl_load
FN fl_load_insn
        mov rax, qword ptr [rdi]        /* 3 bytes, runs out of line */
        ret

FN fl_div
        mov rax, rdi
        xor edx, edx
FN fl_div_insn
        div rsi                         /* 3 bytes, runs out of line */
        ret

FN fl_call
        sub rsp, 8
FN fl_call_insn
        call qword ptr [rdi]            /* emulated: the target is read from memory */
        add rsp, 8
        ret

/* With the trap flag set, each instruction is followed by a single-step trap. */
FN fl_step
        pushfq
        or qword ptr [rsp], 0x100
FN fl_step_popf
        popfq                           /* sets TF: the first step comes after fl_step_a */
FN fl_step_a
        nop dword ptr [rax + rax + 0]   /* 5 bytes */
FN fl_step_b
        mov eax, 1
        add eax, 2
        pushfq
        and qword ptr [rsp], -0x101
        popfq
        ret

        .section .note.GNU-stack, "", @progbits
