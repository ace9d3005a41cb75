# A boot sector that keeps touching guest memory, for QEMU's post-copy
# migration (bench/scripts/qemu-postcopy.sh). Loaded by the BIOS at 0x7c00,
# it switches to 32-bit protected mode with flat segments and then, forever,
# adds 1 to the first byte of each of PAGES pages starting at BASE, visiting
# page (k * STRIDE) mod PAGES at step k (STRIDE coprime with PAGES: every
# page once a pass, in a scattered order when STRIDE > 1). Each write is a
# read and a write of a page, so a page the destination does not have yet
# is a fault served from the source. 'S' on COM1 when it starts, '.' every
# 16 passes.
        .code16
        .globl _start
_start:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        movw %ax, %ss
        movw $0x7c00, %sp
        inb $0x92, %al          # A20 on (fast gate)
        orb $2, %al
        andb $0xfe, %al
        outb %al, $0x92
        lgdtl gdt_desc
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $0x08, $flat
        .code32
flat:
        movw $0x10, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl $0x7c00, %esp
        movw $0x3f8, %dx
        movb $'S', %al
        outb %al, %dx
        xorl %ebp, %ebp         # passes
pass:
        xorl %ecx, %ecx         # step k
        xorl %esi, %esi         # page (k * STRIDE) mod PAGES
1:      movl %esi, %edi
        shll $12, %edi
        addb $1, BASE(%edi)
        addl $STRIDE, %esi
        cmpl $PAGES, %esi
        jb 2f
        subl $PAGES, %esi
2:      incl %ecx
        cmpl $PAGES, %ecx
        jb 1b
        incl %ebp
        testl $15, %ebp
        jnz pass
        movb $'.', %al
        outb %al, %dx
        jmp pass

        .p2align 3
gdt:    .quad 0
        .quad 0x00cf9a000000ffff    # 0x08: code, flat 4 GiB
        .quad 0x00cf92000000ffff    # 0x10: data, flat 4 GiB
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt

        .org 510
        .word 0xaa55
