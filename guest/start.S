/* mdvm test guest: PVH entry, switch to long mode, exception stubs.
 *
 * PVH entry state (Xen PVH ABI, also QEMU and mdvm): 32-bit protected mode,
 * paging off, flat 4 GiB CS/DS, EBX = physical address of hvm_start_info.
 * Interrupts stay disabled for the guest's whole life: it only polls. */

#define GDT_CODE32 0x08
#define GDT_CODE64 0x10
#define GDT_DATA   0x18

#define MSR_EFER   0xc0000080
#define EFER_LME   (1 << 8)
#define CR0_PE     (1 << 0)
#define CR0_ET     (1 << 4)
#define CR0_NE     (1 << 5)
#define CR0_WP     (1 << 16)
#define CR0_PG     (1 << 31)
#define CR4_PAE    (1 << 5)
#define PTE_P      0x001
#define PTE_W      0x002
#define PTE_PS     0x080

#define STACK_SIZE 32768

/* ---- Xen ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) = physical entry point.
 * The descriptor is 8 bytes, like Linux's: QEMU reads a size_t from a 64-bit
 * ELF, and Xen/other loaders accept 4 or 8 byte numeric notes. */
	.section .note.Xen, "a"
	.balign 4
	.long 2f - 1f            /* namesz */
	.long 4f - 3f            /* descsz */
	.long 18                 /* type */
1:	.asciz "Xen"
2:	.balign 4
3:	.quad pvh_start
4:	.balign 4

/* ---- 32-bit entry */
	.section .text.boot, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	movl %ebx, %esi                 /* hvm_start_info, kept in esi until guest_main */

	/* Our own GDT: the loader's may live in memory we are about to reuse. */
	lgdt gdt_desc
	ljmp $GDT_CODE32, $1f
1:	movl $GDT_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs

	/* Zero .bss (page tables, globals): after a VM reset it holds old data. */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl

	/* Identity map 0-4 GiB with 2 MiB pages: PML4[0] -> PDPT[0..3] -> 4 PDs. */
	movl $boot_pdpt + (PTE_P | PTE_W), boot_pml4
	movl $boot_pd + (PTE_P | PTE_W), %eax
	movl %eax, boot_pdpt
	addl $4096, %eax
	movl %eax, boot_pdpt + 8
	addl $4096, %eax
	movl %eax, boot_pdpt + 16
	addl $4096, %eax
	movl %eax, boot_pdpt + 24

	movl $boot_pd, %edi
	movl $(PTE_P | PTE_W | PTE_PS), %eax   /* entry i maps i * 2 MiB; high dword stays 0 */
	xorl %ecx, %ecx
2:	movl %eax, (%edi,%ecx,8)
	addl $0x200000, %eax
	incl %ecx
	cmpl $2048, %ecx
	jb 2b

	/* Long mode: CR4 = PAE only, CR3, EFER.LME, then CR0.PG. */
	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	andl $0x9fffffff, %eax          /* clear CD and NW: caches on */
	orl $(CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $GDT_CODE64, $start64

/* ---- 64-bit */
	.code64
start64:
	movl $GDT_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movq $boot_stack_top, %rsp
	xorl %ebp, %ebp
	movl %esi, %edi                 /* zero-extends: guest_main(start_info) */
	call guest_main
3:	cli
	hlt
	jmp 3b

/* ---- Exception stubs: push a dummy error code where the CPU pushes none,
 * then the vector, and share one path that saves the GPRs and calls
 * exc_handler(struct exc_frame *). It returns only for #MC, after which the
 * (possibly rewritten) frame is restored and iretq resumes. */
.macro EXC vec
	.balign 16
exc_stub_\vec:
	.if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq $0
	.endif
	pushq $\vec
	jmp exc_common
.endm

	.text
	.altmacro
.set i, 0
.rept 32
	EXC %i
	.set i, i + 1
.endr

exc_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	movq %rsp, %rbx                 /* callee-saved: the frame, after the call */
	andq $-16, %rsp                 /* ABI alignment for the C handler */
	call exc_handler
	movq %rbx, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp                  /* vector, error code */
	iretq

	.section .rodata
	.balign 8
	.globl exc_stub_table
exc_stub_table:
.macro STUBADDR vec
	.quad exc_stub_\vec
.endm
.set i, 0
.rept 32
	STUBADDR %i
	.set i, i + 1
.endr

/* ---- GDT: null, 32-bit code, 64-bit code, data. */
	.section .data
	.balign 16
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff        /* 0x08: code, 32-bit, base 0, limit 4 GiB */
	.quad 0x00af9a000000ffff        /* 0x10: code, 64-bit (L=1) */
	.quad 0x00cf92000000ffff        /* 0x18: data, base 0, limit 4 GiB */
gdt_end:
	.balign 8
	.word 0
gdt_desc:                               /* lgdt reads 6 bytes in 32-bit, 10 in 64-bit mode */
	.word gdt_end - gdt - 1
	.quad gdt

/* ---- Boot page tables (zeroed with .bss) and the stack (not zeroed). */
	.section .bss.pagetables, "aw", @nobits
	.balign 4096
	.globl boot_pml4, boot_pdpt, boot_pd
boot_pml4:	.skip 4096
boot_pdpt:	.skip 4096
boot_pd:	.skip 4 * 4096

	.section .noinit, "aw", @nobits
	.balign 4096
	.globl boot_stack, boot_stack_top
boot_stack:	.skip STACK_SIZE
boot_stack_top:
