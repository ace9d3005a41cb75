/* touch mib=N: the first-touch benchmark. Writes one word in every page of
 * N MiB of free RAM (so that the page faults dominate, not the guest's own
 * instructions), reads them back, and reports the time per page.
 *
 * With several vCPUs each one touches its own N MiB (vCPU i the i-th slice
 * of free RAM, disjoint from the others'), and vCPU 0 reports them all:
 * first touches on every vCPU at once, on every node of a pod. */
#include "shoal.h"

struct tctx {
	u64 pages;
	u64 bad;
	u64 from; /* offset of this vCPU's slice in free RAM */
	u64 bytes;
};

/* The part of a piece of free RAM inside this vCPU's slice, as [lo, hi)
 * guest-physical: found once per piece, so the page loop stays as tight as
 * the single-vCPU benchmark needs (every guest instruction is emulated). */
static int overlap(const struct tctx *t, u64 base, u64 len, u64 offset, u64 *lo, u64 *hi)
{
	u64 a = offset > t->from ? offset : t->from;
	u64 b = offset + len < t->from + t->bytes ? offset + len : t->from + t->bytes;
	if (a >= b)
		return 0;
	*lo = base + (a - offset);
	*hi = base + (b - offset);
	return 1;
}

static void touch_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct tctx *t = p;
	u64 lo, hi;
	if (!overlap(t, base, len, offset, &lo, &hi))
		return;
	for (u64 a = lo; a < hi; a += PAGE)
		*(volatile u64 *)a = a;
	t->pages += (hi - lo) / PAGE;
}

static void check_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct tctx *t = p;
	u64 lo, hi;
	if (!overlap(t, base, len, offset, &lo, &hi))
		return;
	for (u64 a = lo; a < hi; a += PAGE)
		t->bad += *(volatile u64 *)a != a;
}

/* per vCPU: pages touched, bad words, nanoseconds (written by each vCPU
 * into its own page, so the reports share nothing while they run) */
struct report {
	volatile u64 done, pages, bad, ns;
	u8 pad[PAGE - 32];
};
static struct report reports[64] __attribute__((aligned(4096)));

static void touch_slice(const struct shoal_boot_info *bi, u64 mib)
{
	struct tctx t = { 0, 0, bi->vcpu_id * mib * MIB, mib * MIB };
	u64 t0 = shoal_clock_ns();
	shoal_for_free(bi, t.from + t.bytes, touch_piece, &t);
	u64 t1 = shoal_clock_ns();
	shoal_for_free(bi, t.from + t.bytes, check_piece, &t);
	struct report *r = &reports[bi->vcpu_id];
	r->pages = t.pages;
	r->bad = t.bad;
	r->ns = t1 - t0;
	__atomic_store_n(&r->done, 1, __ATOMIC_SEQ_CST);
}

u64 shoal_ap_main(const struct shoal_boot_info *bi)
{
	u64 mib = shoal_arg_or(bi, "mib", 16);
	if (bi->vcpu_id < 64 && (bi->vcpu_id + 1) * mib * MIB <= shoal_free_bytes(bi))
		touch_slice(bi, mib);
	for (;;)
		__asm__ volatile("hlt");
}

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 mib = shoal_arg_or(bi, "mib", 16);
	u64 free = shoal_free_bytes(bi), n = bi->num_vcpus;
	if (n > 64 || mib > free || mib * MIB * n > free) {
		shoal_printf("touch: error: %lu vCPUs x mib=%lu is more than the %lu MiB of free guest RAM (or over 64 vCPUs)\n",
			     n, mib, free / MIB);
		return 2;
	}
	touch_slice(bi, mib);
	u64 pages = 0, bad = 0, ns = 0;
	for (u64 i = 0; i < n; i++) {
		while (!__atomic_load_n(&reports[i].done, __ATOMIC_SEQ_CST))
			;
		pages += reports[i].pages;
		bad += reports[i].bad;
		if (reports[i].ns > ns)
			ns = reports[i].ns;
	}
	if (n == 1)
		shoal_printf("touch: pages=%lu first_touch_ns=%lu bad=%lu\n", pages, ns, bad);
	else
		shoal_printf("touch: vcpus=%lu pages=%lu first_touch_ns=%lu (the slowest vCPU) bad=%lu\n", n, pages, ns, bad);
	return bad ? 1 : 0;
}
