/* A function that returns with `ret 16` (it pops its two stack arguments), and a caller. */
        .intel_syntax noprefix
        .text
        .globl ret16_fn
        .type ret16_fn, @function
ret16_fn:
        mov rax, [rsp + 8]
        add rax, [rsp + 16]
        ret 16

        .globl call_ret16
        .type call_ret16, @function
call_ret16:
        push rsi
        push rdi
        call ret16_fn
        ret
        .section .note.GNU-stack, "", @progbits

/* A function alone on its page, so that the page can be made non-executable for a moment while
 * nothing else runs on it. */
        .text
        .p2align 12
        .globl pagef
        .type pagef, @function
pagef:
        lea rax, [rdi + 1]
        ret
        .p2align 12
        .section .note.GNU-stack, "", @progbits
