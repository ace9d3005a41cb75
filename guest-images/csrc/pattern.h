/* The memtouch pattern, shared by memtouch and zeroboot. */
#ifndef PATTERN_H
#define PATTERN_H
#include "shoal.h"

struct pattern_result {
	u64 pages;
	u64 bad_pages;
	u64 first_bad;   /* guest-physical address of the first bad word */
	u64 checksum;
	u64 write_ns;
	u64 verify_ns;
};

/* Write a seed-derived pattern over the first `bytes` of free RAM (every
 * 8-byte word of page p holds mix64(seed ^ p)), read all of it back, and
 * fold what was read into a checksum that depends only on seed and bytes. */
void pattern_run(const struct shoal_boot_info *bi, u64 bytes, u64 seed, struct pattern_result *r);
/* Verifies [from, to) of the pattern pattern_run wrote over `bytes` (page
 * aligned offsets into it), adding to r. */
void pattern_verify_range(const struct shoal_boot_info *bi, u64 bytes, u64 seed, u64 from, u64 to,
			  struct pattern_result *r);
/* Prints the result line; returns the guest's exit status (0 ok, 1 bad). */
int pattern_report(const char *who, u64 mib, u64 seed, const struct pattern_result *r);
#endif
