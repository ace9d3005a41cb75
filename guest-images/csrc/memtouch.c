/* memtouch mib=N seed=S: write a seed-derived pattern over N MiB of free
 * RAM, read it all back, print checksum=0x...; exit 0 when every word
 * verified, 1 otherwise, 2 for a bad command line. */
#include "pattern.h"

u64 shoal_main(const struct shoal_boot_info *bi)
{
	u64 mib = shoal_arg_or(bi, "mib", 16), seed = shoal_arg_or(bi, "seed", 1);
	u64 free = shoal_free_bytes(bi);
	if (mib * MIB > free || mib > free) {
		shoal_printf("memtouch: error: mib=%lu is more than the %lu MiB of free guest RAM\n", mib, free / MIB);
		return 2;
	}
	struct pattern_result r;
	pattern_run(bi, mib * MIB, seed, &r);
	return (u64)pattern_report("memtouch", mib, seed, &r);
}
