/* touch mib=N: the first-touch benchmark. Writes one word in every page of
 * N MiB of free RAM (so that the page faults dominate, not the guest's own
 * instructions), reads them back, and reports the time per page. */
#include "shoal.h"

struct tctx {
	u64 pages;
	u64 bad;
};

static void touch_piece(u64 base, u64 len, u64 offset, void *p)
{
	(void)offset;
	struct tctx *t = p;
	for (u64 o = 0; o < len; o += PAGE)
		*(volatile u64 *)(base + o) = base + o;
	t->pages += len / PAGE;
}

static void check_piece(u64 base, u64 len, u64 offset, void *p)
{
	(void)offset;
	struct tctx *t = p;
	for (u64 o = 0; o < len; o += PAGE)
		t->bad += *(volatile u64 *)(base + o) != base + o;
}

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 mib = shoal_arg_or(bi, "mib", 16);
	u64 free = shoal_free_bytes(bi);
	if (mib * MIB > free || mib > free) {
		shoal_printf("touch: error: mib=%lu is more than the %lu MiB of free guest RAM\n", mib, free / MIB);
		return 2;
	}
	struct tctx t = { 0, 0 };
	u64 t0 = shoal_clock_ns();
	shoal_for_free(bi, mib * MIB, touch_piece, &t);
	u64 t1 = shoal_clock_ns();
	shoal_for_free(bi, mib * MIB, check_piece, &t);
	u64 t2 = shoal_clock_ns();
	shoal_printf("touch: pages=%lu first_touch_ns=%lu retouch_ns=%lu bad=%lu\n", t.pages, t1 - t0, t2 - t1, t.bad);
	return t.bad ? 1 : 0;
}
