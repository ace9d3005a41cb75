// memfill MIB: allocates MIB MiB, fills it with a pattern derived from
// each word's index, reads it all back and prints a checksum; exits 0 when
// every word verified, 1 otherwise. The Linux guests' memory workload.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t mix(uint64_t x) {
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

int main(int argc, char **argv) {
	unsigned long mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 64;
	size_t words = mib * (1u << 20) / sizeof(uint64_t);
	uint64_t *p = malloc(words * sizeof(uint64_t));
	if (!p) {
		printf("memfill: cannot allocate %lu MiB\n", mib);
		return 1;
	}
	for (size_t i = 0; i < words; i++)
		p[i] = mix(i);
	uint64_t sum = 0;
	size_t bad = 0;
	for (size_t i = 0; i < words; i++) {
		if (p[i] != mix(i))
			bad++;
		sum ^= p[i] + i;
	}
	printf("memfill: mib=%lu checksum=0x%016llx bad=%zu\n", mib, (unsigned long long)sum, bad);
	if (bad)
		return 1;
	printf("memfill: verified %lu MiB\n", mib);
	return 0;
}
