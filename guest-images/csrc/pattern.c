#include "pattern.h"

struct ctx {
	u64 seed;
	struct pattern_result *r;
};

static u64 page_value(u64 seed, u64 offset) { return shoal_mix64(seed ^ (offset / PAGE)); }

static void write_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct ctx *c = p;
	for (u64 o = 0; o < len; o += PAGE)
		shoal_fill_words((u64 *)(base + o), page_value(c->seed, offset + o), PAGE / 8);
}

static void verify_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct ctx *c = p;
	for (u64 o = 0; o < len; o += PAGE) {
		const u64 *page = (const u64 *)(base + o);
		u64 v = page_value(c->seed, offset + o);
		u64 m = shoal_find_mismatch(page, v, PAGE / 8);
		if (m != PAGE / 8) {
			if (!c->r->bad_pages++)
				c->r->first_bad = base + o + m * 8;
		}
		/* fold what memory holds (its first and last word), not what
		 * we expect */
		c->r->checksum = shoal_mix64(c->r->checksum ^ page[0]);
		c->r->checksum = shoal_mix64(c->r->checksum ^ page[PAGE / 8 - 1]);
		c->r->pages++;
	}
}

void pattern_run(const struct shoal_boot_info *bi, u64 bytes, u64 seed, struct pattern_result *r)
{
	struct ctx c = { seed, r };
	memset(r, 0, sizeof(*r));
	u64 t0 = shoal_clock_ns();
	shoal_for_free(bi, bytes, write_piece, &c);
	u64 t1 = shoal_clock_ns();
	shoal_for_free(bi, bytes, verify_piece, &c);
	u64 t2 = shoal_clock_ns();
	r->write_ns = t1 - t0;
	r->verify_ns = t2 - t1;
}

struct range_ctx {
	struct ctx c;
	u64 from, to;
};

static void verify_range_piece(u64 base, u64 len, u64 offset, void *p)
{
	struct range_ctx *rc = p;
	u64 lo = offset > rc->from ? offset : rc->from;
	u64 hi = offset + len < rc->to ? offset + len : rc->to;
	if (lo < hi)
		verify_piece(base + (lo - offset), hi - lo, lo, &rc->c);
}

void pattern_verify_range(const struct shoal_boot_info *bi, u64 bytes, u64 seed, u64 from, u64 to,
			  struct pattern_result *r)
{
	struct range_ctx rc = { { seed, r }, from, to };
	shoal_for_free(bi, bytes, verify_range_piece, &rc);
}

int pattern_report(const char *who, u64 mib, u64 seed, const struct pattern_result *r)
{
	shoal_printf("%s: mib=%lu seed=%lu pages=%lu checksum=0x%016lx write_ns=%lu verify_ns=%lu\n", who, mib, seed,
		     r->pages, r->checksum, r->write_ns, r->verify_ns);
	if (r->bad_pages) {
		shoal_printf("%s: FAILED: %lu bad pages, first bad word at 0x%lx\n", who, r->bad_pages, r->first_bad);
		return 1;
	}
	shoal_printf("%s: verified %lu pages\n", who, r->pages);
	return 0;
}
