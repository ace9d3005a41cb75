/* memtouch mib=N seed=S: write a seed-derived pattern over N MiB of free
 * RAM, read it all back, print checksum=0x...; exit 0 when every word
 * verified, 1 otherwise, 2 for a bad command line.
 *
 * hot=H rounds=R: then R rounds, each reading the first H MiB again (the
 * hot set) and the next R-th of the rest (the cold set, each part read
 * once): under a memory bound smaller than N and larger than H, an
 * eviction policy that sees the guest's accesses keeps the hot set, and
 * one that does not fetches it back every round. */
#include "pattern.h"

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 mib = shoal_arg_or(bi, "mib", 16), seed = shoal_arg_or(bi, "seed", 1);
	u64 free = shoal_free_bytes(bi);
	if (mib * MIB > free || mib > free) {
		shoal_printf("memtouch: error: mib=%lu is more than the %lu MiB of free guest RAM\n", mib, free / MIB);
		return 2;
	}
	u64 hot = shoal_arg_or(bi, "hot", 0), rounds = shoal_arg_or(bi, "rounds", 0);
	if (rounds && (hot >= mib || hot == 0)) {
		shoal_printf("memtouch: error: hot=%lu must be between 1 and mib=%lu - 1\n", hot, mib);
		return 2;
	}
	struct pattern_result r;
	pattern_run(bi, mib * MIB, seed, &r);
	int status = pattern_report("memtouch", mib, seed, &r);
	if (status || !rounds)
		return (u64)status;
	struct pattern_result again;
	memset(&again, 0, sizeof(again));
	u64 cold = (mib - hot) * MIB, slice = cold / rounds / PAGE * PAGE;
	u64 t0 = shoal_clock_ns();
	for (u64 k = 0; k < rounds; k++) {
		pattern_verify_range(bi, mib * MIB, seed, 0, hot * MIB, &again);
		u64 from = hot * MIB + k * slice;
		pattern_verify_range(bi, mib * MIB, seed, from, k + 1 == rounds ? mib * MIB : from + slice, &again);
	}
	shoal_printf("memtouch: hot/cold: rounds=%lu hot=%lu MiB pages=%lu bad=%lu ns=%lu\n", rounds, hot, again.pages,
		     again.bad_pages, shoal_clock_ns() - t0);
	return again.bad_pages ? 1 : 0;
}
