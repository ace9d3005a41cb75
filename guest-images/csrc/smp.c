/* smp iters=K exits=E: every vCPU adds 1 to one shared counter K times with
 * locked atomic adds; vCPU 0 waits for the others and checks the total.
 * exits=1: an exit to the VMM (HC_CLOCK_NS) after each add. On a pod it
 * ends the hold on the counter's page (the page a vCPU waited for stays
 * until the host sees the vCPU ran on), so vCPUs on different nodes take
 * the page in turns far more often (in the netem test, a move per 4 or 5
 * adds, 415-497 moves for 2000 adds) instead of each adding many times
 * per move: a test of the page protocol under heavy traffic. */
#include "shoal.h"

static volatile u64 counter;
static volatile u64 finished;
/* per vCPU id (from its own boot-info block): how many vCPUs claimed it,
 * and whether the vCPU's stack was the one its block names */
static volatile u64 claimed[256];
static volatile u64 own_stack[256];

static void add_all(const struct shoal_boot_info *bi)
{
	u64 iters = shoal_arg_or(bi, "iters", 1000), exits = shoal_arg_or(bi, "exits", 0);
	u64 here = (u64)&iters;
	if (bi->vcpu_id < 256) {
		__atomic_fetch_add(&claimed[bi->vcpu_id], 1, __ATOMIC_SEQ_CST);
		own_stack[bi->vcpu_id] = here < bi->stack_top && here >= bi->stack_top - 64 * 1024;
	}
	for (u64 i = 0; i < iters; i++) {
		__atomic_fetch_add(&counter, 1, __ATOMIC_SEQ_CST);
		if (exits)
			shoal_hc(SHOAL_HC_CLOCK_NS, 0, 0, 0);
	}
	__atomic_fetch_add(&finished, 1, __ATOMIC_SEQ_CST);
}

u64 shoal_ap_main(const struct shoal_boot_info *bi)
{
	add_all(bi);
	for (;;)
		__asm__ volatile("hlt"); /* the VMM retires a halted vCPU */
}

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 iters = shoal_arg_or(bi, "iters", 1000);
	add_all(bi);
	while (__atomic_load_n(&finished, __ATOMIC_SEQ_CST) != bi->num_vcpus)
		;
	u64 want = iters * bi->num_vcpus, got = __atomic_load_n(&counter, __ATOMIC_SEQ_CST);
	shoal_printf("smp: vcpus=%lu iters=%lu counter=%lu expected=%lu\n", bi->num_vcpus, iters, got, want);
	if (got != want) {
		shoal_printf("smp: FAILED: lost %ld increments\n", (i64)(want - got));
		return 1;
	}
	for (u64 i = 0; i < bi->num_vcpus && i < 256; i++) {
		if (claimed[i] != 1 || !own_stack[i]) {
			shoal_printf("smp: FAILED: vcpu %lu: its boot-info block was claimed %lu times, own stack %lu\n", i,
				     claimed[i], own_stack[i]);
			return 1;
		}
	}
	shoal_printf("smp: each vcpu had its own boot-info block and stack\n");
	shoal_printf("smp: OK\n");
	return 0;
}
