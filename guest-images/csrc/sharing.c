/* sharing rounds=K ipi=I: one writer, readers on other vCPUs (on other
 * nodes of a pod) polling one page.
 *
 * vCPU 0 writes 1, 2, ..., K into a shared page; after each value it waits
 * until every reader has acknowledged it (each reader writes its own page,
 * so the acknowledgements do not share the writer's page). Readers check
 * that they see every value, in order. With ipi=1 the writer also sends
 * each reader an IPI after each write and the readers sleep until it
 * arrives (HC_WAIT_IPI) instead of polling; the writer reports the mean
 * round trip from a write to the last acknowledgement. */
#include "shoal.h"

#define MAX_READERS 64

struct page {
	volatile u64 v;
	u8 pad[PAGE - 8];
};

static struct page shared __attribute__((aligned(4096)));
static struct page acks[MAX_READERS] __attribute__((aligned(4096)));
static struct page errors __attribute__((aligned(4096)));

u64 shoal_ap_main(const struct shoal_boot_info *bi)
{
	u64 rounds = shoal_arg_or(bi, "rounds", 100), ipi = shoal_arg_or(bi, "ipi", 0);
	u64 me = bi->vcpu_id;
	if (me >= MAX_READERS)
		for (;;)
			__asm__ volatile("hlt");
	u64 expected = 1;
	while (expected <= rounds) {
		if (ipi)
			shoal_hc(SHOAL_HC_WAIT_IPI, 0, 0, 0);
		u64 v = shared.v;
		if (v == expected) {
			acks[me].v = v;
			expected++;
		} else if (v > expected) {
			__atomic_fetch_add(&errors.v, 1, __ATOMIC_SEQ_CST);
			acks[me].v = v;
			expected = v + 1;
		}
	}
	for (;;)
		__asm__ volatile("hlt");
}

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 rounds = shoal_arg_or(bi, "rounds", 100), ipi = shoal_arg_or(bi, "ipi", 0);
	u64 readers = bi->num_vcpus - 1;
	if (readers == 0 || readers >= MAX_READERS) {
		shoal_printf("sharing: error: needs 2 to %d vCPUs\n", MAX_READERS);
		return 2;
	}
	u64 t0 = shoal_clock_ns();
	for (u64 r = 1; r <= rounds; r++) {
		shared.v = r;
		if (ipi)
			for (u64 k = 1; k <= readers; k++)
				shoal_hc(SHOAL_HC_IPI, k, 0, 0);
		for (u64 k = 1; k <= readers; k++)
			while (acks[k].v != r)
				;
	}
	u64 t1 = shoal_clock_ns();
	if (errors.v) {
		shoal_printf("sharing: FAILED: readers skipped %lu values\n", errors.v);
		return 1;
	}
	shoal_printf("sharing: readers=%lu rounds=%lu ipi=%lu round_trip_ns=%lu ok\n", readers, rounds, ipi,
		     (t1 - t0) / rounds);
	return 0;
}
