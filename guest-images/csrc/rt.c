/* The guest runtime shared by every shoal guest. */
#include "shoal.h"

#define COM1 0x3f8
#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20

static inline void outb(u32 port, u8 v) { __asm__ volatile("outb %0, %w1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u32 port) { u8 v; __asm__ volatile("inb %w1, %0" : "=a"(v) : "Nd"(port)); return v; }

u64 shoal_hc(u64 nr, u64 a0, u64 a1, u64 a2)
{
	u64 ret;
	__asm__ volatile("outl %%eax, %%dx"
			 : "=a"(ret)
			 : "a"(nr), "d"((u64)SHOAL_HC_PORT), "D"(a0), "S"(a1), "c"(a2)
			 : "memory");
	return ret;
}

void shoal_exit(u64 status)
{
	shoal_hc(SHOAL_HC_EXIT, status, 0, 0);
	for (;;)
		__asm__ volatile("hlt");
}

u64 shoal_main(const struct shoal_boot_info *bi);

/* vCPUs other than 0 halt unless the guest gives them work */
__attribute__((weak)) u64 shoal_ap_main(const struct shoal_boot_info *bi)
{
	(void)bi;
	for (;;)
		__asm__ volatile("hlt");
}

u64 shoal_entry(const struct shoal_boot_info *bi)
{
	if (bi->vcpu_id != 0)
		return shoal_ap_main(bi);
	return shoal_main(bi);
}

u64 shoal_clock_ns(void) { return shoal_hc(SHOAL_HC_CLOCK_NS, 0, 0, 0); }
u64 shoal_info(u64 key) { return shoal_hc(SHOAL_HC_INFO, key, 0, 0); }

void shoal_putc(char c)
{
	while (!(inb(COM1_LSR) & LSR_THRE))
		;
	outb(COM1, (u8)c);
}

void shoal_puts(const char *s)
{
	while (*s)
		shoal_putc(*s++);
}

void shoal_hc_print(const char *s) { shoal_hc(SHOAL_HC_PRINT, (u64)s, strlen(s), 0); }

static void put_u64(u64 v, unsigned base, int width, char pad)
{
	char buf[24];
	int n = 0;
	do {
		unsigned d = (unsigned)(v % base);
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v && n < (int)sizeof(buf));
	while (n < width--)
		shoal_putc(pad);
	while (n)
		shoal_putc(buf[--n]);
}

/* %s %c %d %u %x %lu %lx %ld %016lx %% : enough for our guests */
void shoal_printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			shoal_putc(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, is_long = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's': shoal_puts(va_arg(ap, const char *)); break;
		case 'c': shoal_putc((char)va_arg(ap, int)); break;
		case 'u': put_u64(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad); break;
		case 'x': put_u64(is_long ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad); break;
		case 'd': {
			i64 v = is_long ? va_arg(ap, i64) : va_arg(ap, int);
			if (v < 0) {
				shoal_putc('-');
				v = -v;
			}
			put_u64((u64)v, 10, width, pad);
			break;
		}
		case '%': shoal_putc('%'); break;
		case 0: fmt--; break;
		default: shoal_putc('%'); shoal_putc(*fmt); break;
		}
	}
	va_end(ap);
}

static int parse_u64(const char *s, u64 len, u64 *out)
{
	u64 v = 0, base = 10, i = 0;
	if (len == 0)
		return ARG_BAD;
	if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	for (; i < len; i++) {
		char c = s[i];
		u64 d;
		if (c >= '0' && c <= '9')
			d = (u64)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (u64)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (u64)(c - 'A' + 10);
		else
			return ARG_BAD;
		if (v > (~0ul - d) / base)
			return ARG_BAD; /* overflow */
		v = v * base + d;
	}
	*out = v;
	return ARG_OK;
}

int shoal_arg_u64(const struct shoal_boot_info *bi, const char *key, u64 *out)
{
	const char *s = (const char *)bi->cmdline_gpa;
	u64 n = bi->cmdline_len, klen = strlen(key), i = 0;
	while (i < n) {
		while (i < n && s[i] == ' ')
			i++;
		u64 start = i;
		while (i < n && s[i] != ' ')
			i++;
		if (i - start > klen && memcmp(s + start, key, klen) == 0 && s[start + klen] == '=')
			return parse_u64(s + start + klen + 1, i - start - klen - 1, out);
	}
	return ARG_ABSENT;
}

u64 shoal_arg_or(const struct shoal_boot_info *bi, const char *key, u64 dflt)
{
	u64 v;
	switch (shoal_arg_u64(bi, key, &v)) {
	case ARG_OK: return v;
	case ARG_ABSENT: return dflt;
	default:
		shoal_printf("error: cmdline %s= needs a decimal or 0x-hex number\n", key);
		shoal_exit(2);
	}
}

int shoal_free_range(const struct shoal_boot_info *bi, u64 i, u64 *base, u64 *len)
{
	u64 k = 0;
	for (u64 r = 0; r < bi->num_regions && r < SHOAL_BOOT_INFO_MAX_REGIONS; r++) {
		u64 b = bi->regions[r].base, e = b + bi->regions[r].len;
		if (b < bi->free_base)
			b = bi->free_base;
		if (b >= e)
			continue;
		if (k++ == i) {
			*base = b;
			*len = e - b;
			return 1;
		}
	}
	return 0;
}

u64 shoal_free_bytes(const struct shoal_boot_info *bi)
{
	u64 total = 0, b, l;
	for (u64 i = 0; shoal_free_range(bi, i, &b, &l); i++)
		total += l;
	return total;
}

u64 shoal_for_free(const struct shoal_boot_info *bi, u64 bytes, shoal_piece_fn fn, void *ctx)
{
	u64 done = 0, b, l;
	for (u64 i = 0; done < bytes && shoal_free_range(bi, i, &b, &l); i++) {
		if (l > bytes - done)
			l = bytes - done;
		fn(b, l, done, ctx);
		done += l;
	}
	return done;
}

void shoal_fill_words(u64 *dst, u64 value, u64 nwords)
{
	__asm__ volatile("rep stosq" : "+D"(dst), "+c"(nwords) : "a"(value) : "memory");
}

u64 shoal_find_mismatch(const u64 *src, u64 value, u64 nwords)
{
	u64 left = nwords;
	if (!nwords)
		return 0;
	/* repe scasq stops after the first unequal word */
	__asm__ volatile("repe scasq" : "+D"(src), "+c"(left) : "a"(value) : "memory", "cc");
	if (left == 0 && src[-1] == value)
		return nwords;
	return nwords - left - 1;
}

u64 shoal_mix64(u64 x)
{
	/* splitmix64's finaliser */
	x += 0x9e3779b97f4a7c15ul;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ul;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebul;
	return x ^ (x >> 31);
}

void *memset(void *dst, int c, u64 n)
{
	u8 *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, u64 n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

int memcmp(const void *a, const void *b, u64 n)
{
	const u8 *x = a, *y = b;
	for (u64 i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

u64 strlen(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}
