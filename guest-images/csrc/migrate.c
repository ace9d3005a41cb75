/* migrate mode=M mib=N rounds=R: vCPU migration between the nodes of a pod.
 *
 * mode=0 (tour): vCPU 0 fills N MiB with a pattern, then moves itself to
 * every node in turn (HC_MIGRATE), R rounds; after every move it checks that
 * it runs where it asked to (HC_INFO), that six callee-saved registers set
 * just before the move hold their values, that a canary on its stack
 * survived, and that the pattern's checksum is unchanged. Exits 0 when all
 * held.
 *
 * mode=1 (follow): the data lives on another node: vCPU 0 moves to node 1,
 * writes N MiB there, moves back to node 0 and reads it all R times. With
 * the migration policy on, the vCPU follows its data to node 1 after a
 * few remote faults; with it off, every page is pulled to node 0. Prints
 * where it ended and the checksum (a function of N only).
 *
 * mode=2: asks to move to a node outside the pod (shoal ends the VM). */
#include "shoal.h"

static u64 migrate_to(u64 node, u64 *saved)
{
	u64 ret;
	/* the registers a move must keep, set right before the hypercall and
	 * read right after it */
	__asm__ volatile("mov $0x1111111111111111, %%rbx\n\t"
			 "mov $0x2222222222222222, %%r12\n\t"
			 "mov $0x3333333333333333, %%r13\n\t"
			 "mov $0x4444444444444444, %%r14\n\t"
			 "mov $0x5555555555555555, %%r15\n\t"
			 "outl %%eax, %%dx\n\t"
			 "mov %%rbx, 0(%[s])\n\t"
			 "mov %%r12, 8(%[s])\n\t"
			 "mov %%r13, 16(%[s])\n\t"
			 "mov %%r14, 24(%[s])\n\t"
			 "mov %%r15, 32(%[s])\n\t"
			 : "=a"(ret)
			 : "a"((u64)SHOAL_HC_MIGRATE), "d"((u64)SHOAL_HC_PORT), "D"(node), [s] "S"(saved)
			 : "rbx", "r12", "r13", "r14", "r15", "rcx", "memory");
	return ret;
}

static int regs_kept(const u64 *saved)
{
	static const u64 want[5] = { 0x1111111111111111ul, 0x2222222222222222ul, 0x3333333333333333ul,
				     0x4444444444444444ul, 0x5555555555555555ul };
	for (int i = 0; i < 5; i++)
		if (saved[i] != want[i])
			return 0;
	return 1;
}

struct sum {
	u64 value;
	u64 pages;
};

static void fill_piece(u64 base, u64 len, u64 offset, void *p)
{
	(void)p;
	for (u64 o = 0; o < len; o += PAGE)
		shoal_fill_words((u64 *)(base + o), shoal_mix64((offset + o) / PAGE), PAGE / 8);
}

static void sum_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct sum *s = p;
	for (u64 o = 0; o < len; o += PAGE) {
		u64 v = shoal_mix64((offset + o) / PAGE);
		if (shoal_find_mismatch((const u64 *)(base + o), v, PAGE / 8) != PAGE / 8)
			v = ~v; /* a wrong page changes the checksum */
		s->value = shoal_mix64(s->value ^ v);
		s->pages++;
	}
}

static u64 checksum(const struct shoal_boot_info *bi, u64 bytes)
{
	struct sum s = { 0, 0 };
	shoal_for_free(bi, bytes, sum_piece, &s);
	return s.value;
}

static u64 tour(const struct shoal_boot_info *bi, u64 bytes, u64 rounds)
{
	u64 nodes = shoal_info(SHOAL_INFO_NUM_NODES);
	volatile u64 canary[16];
	for (u64 i = 0; i < 16; i++)
		canary[i] = shoal_mix64(i + 77);
	shoal_for_free(bi, bytes, fill_piece, 0);
	u64 want = checksum(bi, bytes), moves = 0, move_ns = 0;
	for (u64 r = 0; r < rounds; r++) {
		for (u64 k = 0; k < nodes; k++) {
			u64 node = (k + 1) % nodes;
			u64 saved[5] = { 0 };
			u64 t0 = shoal_clock_ns();
			u64 ret = migrate_to(node, saved);
			move_ns += shoal_clock_ns() - t0;
			moves++;
			u64 here = shoal_info(SHOAL_INFO_NODE_ID);
			if (ret != 0 || here != node || !regs_kept(saved)) {
				shoal_printf("migrate: FAILED: move %lu to node %lu: returned %lu, runs on node %lu, registers %s\n",
					     moves, node, ret, here, regs_kept(saved) ? "kept" : "LOST");
				return 1;
			}
			for (u64 i = 0; i < 16; i++) {
				if (canary[i] != shoal_mix64(i + 77)) {
					shoal_printf("migrate: FAILED: the stack changed after move %lu\n", moves);
					return 1;
				}
			}
			u64 got = checksum(bi, bytes);
			if (got != want) {
				shoal_printf("migrate: FAILED: checksum %lx after move %lu, wanted %lx\n", got, moves, want);
				return 1;
			}
		}
	}
	shoal_printf("migrate: tour ok: %lu moves over %lu nodes, registers, stack and checksum=0x%lx kept, move_ns=%lu\n",
		     moves, nodes, want, move_ns / moves);
	return 0;
}

static u64 follow(const struct shoal_boot_info *bi, u64 bytes, u64 rounds)
{
	u64 saved[5];
	if (shoal_info(SHOAL_INFO_NUM_NODES) < 2) {
		shoal_printf("migrate: error: mode=1 needs a pod of 2 or more nodes\n");
		return 2;
	}
	migrate_to(1, saved);
	shoal_for_free(bi, bytes, fill_piece, 0);
	migrate_to(0, saved);
	u64 t0 = shoal_clock_ns(), sum = 0;
	for (u64 r = 0; r < rounds; r++)
		sum = checksum(bi, bytes);
	u64 t1 = shoal_clock_ns();
	shoal_printf("migrate: follow: checksum=0x%lx read_ns=%lu ended on node %lu\n", sum, t1 - t0,
		     shoal_info(SHOAL_INFO_NODE_ID));
	return 0;
}

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 mode = shoal_arg_or(bi, "mode", 0), mib = shoal_arg_or(bi, "mib", 1), rounds = shoal_arg_or(bi, "rounds", 1);
	if (mib * MIB > shoal_free_bytes(bi)) {
		shoal_printf("migrate: error: mib=%lu is more than the free guest RAM\n", mib);
		return 2;
	}
	switch (mode) {
	case 0: return tour(bi, mib * MIB, rounds);
	case 1: return follow(bi, mib * MIB, rounds);
	case 2: {
		/* a move to the node one past the last: shoal must end the VM */
		u64 saved[5];
		migrate_to(shoal_info(SHOAL_INFO_NUM_NODES), saved);
		shoal_printf("migrate: FAILED: a move outside the pod returned\n");
		return 1;
	}
	default: shoal_printf("migrate: error: mode=%lu; use 0 (tour), 1 (follow) or 2 (outside)\n", mode); return 2;
	}
}
