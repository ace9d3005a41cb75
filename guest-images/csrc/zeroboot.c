/* zeroboot mib=N: zero all free RAM like an OS boot does, check a sample
 * reads zero, then run the memtouch pattern over N MiB. The fast-boot
 * workload: with dormant pages no page data needs to move. */
#include "pattern.h"

struct zctx {
	u64 nonzero;
	u64 first;
	u64 samples;
};

static void zero_piece(u64 base, u64 len, u64 offset, void *p)
{
	(void)offset;
	(void)p;
	shoal_fill_words((u64 *)base, 0, len / 8);
}

/* one word in every 64 KiB, at a varying offset inside its page */
static void sample_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct zctx *z = p;
	for (u64 o = 0; o < len; o += 64 * 1024) {
		u64 at = base + o + (((offset + o) >> 16) * 8 % PAGE);
		if (at + 8 > base + len)
			break;
		z->samples++;
		if (*(volatile u64 *)at != 0 && !z->nonzero++)
			z->first = at;
	}
}

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 mib = shoal_arg_or(bi, "mib", 16), seed = shoal_arg_or(bi, "seed", 1);
	u64 free = shoal_free_bytes(bi);
	if (mib * MIB > free || mib > free) {
		shoal_printf("zeroboot: error: mib=%lu is more than the %lu MiB of free guest RAM\n", mib, free / MIB);
		return 2;
	}
	struct zctx z = { 0, 0, 0 };
	u64 t0 = shoal_clock_ns();
	u64 zeroed = shoal_for_free(bi, free, zero_piece, 0);
	u64 t1 = shoal_clock_ns();
	shoal_for_free(bi, free, sample_piece, &z);
	shoal_printf("zeroboot: zeroed %lu MiB in %lu ns, %lu samples, %lu not zero\n", zeroed / MIB, t1 - t0,
		     z.samples, z.nonzero);
	if (z.nonzero) {
		shoal_printf("zeroboot: FAILED: word at 0x%lx is not zero after zeroing\n", z.first);
		return 1;
	}
	struct pattern_result r;
	pattern_run(bi, mib * MIB, seed, &r);
	return (u64)pattern_report("zeroboot", mib, seed, &r);
}
