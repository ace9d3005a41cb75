/* Entry of every guest: rdi = boot-info block, rsp = this vCPU's stack. */
    .section .text.start, "ax"
    .globl _start
_start:
    xor  %ebp, %ebp
    call shoal_entry         /* rdi passes straight through */
    mov  %rax, %rdi          /* returned status */
    call shoal_exit
1:  hlt
    jmp 1b
