/* The guest runtime: hypercalls, console, command line, free memory. */
#ifndef SHOAL_H
#define SHOAL_H

#include <stdarg.h>
#include "shoal_abi.h"   /* generated from guest-images/src/abi.rs */

typedef unsigned long u64;
typedef long i64;
typedef unsigned int u32;
typedef unsigned char u8;

#define MIB (1024ul * 1024ul)
#define PAGE 4096ul

/* Entry points a guest defines: shoal_main runs on vCPU 0; shoal_ap_main on
 * every other vCPU (by default they halt, which retires them). */
u64 shoal_main(const struct shoal_boot_info *bi);
u64 shoal_ap_main(const struct shoal_boot_info *bi);

u64 shoal_hc(u64 nr, u64 a0, u64 a1, u64 a2);
void shoal_exit(u64 status) __attribute__((noreturn));
u64 shoal_clock_ns(void);
u64 shoal_info(u64 key);

/* console (16550 at 0x3f8) */
void shoal_putc(char c);
void shoal_puts(const char *s);
void shoal_printf(const char *fmt, ...);
/* console through the HC_PRINT hypercall: one exit per call */
void shoal_hc_print(const char *s);

/* command line: key=value words, values decimal or 0x-hex */
#define ARG_ABSENT 0
#define ARG_OK 1
#define ARG_BAD (-1)
int shoal_arg_u64(const struct shoal_boot_info *bi, const char *key, u64 *out);
/* The value of key, or dflt when absent; a malformed value ends the guest
 * with status 2 and a message. */
u64 shoal_arg_or(const struct shoal_boot_info *bi, const char *key, u64 dflt);

/* Free RAM: the regions above free_base, as ranges. Returns 0 when i is
 * past the last range. */
int shoal_free_range(const struct shoal_boot_info *bi, u64 i, u64 *base, u64 *len);
u64 shoal_free_bytes(const struct shoal_boot_info *bi);

/* The walk over the first `bytes` of free RAM, in contiguous pieces. */
typedef void (*shoal_piece_fn)(u64 base, u64 len, u64 offset, void *ctx);
u64 shoal_for_free(const struct shoal_boot_info *bi, u64 bytes, shoal_piece_fn fn, void *ctx);

/* Whole-page fill and check with one string instruction each: the KVM on
 * our development machines emulates every instruction (~250 ns), so a
 * word-at-a-time loop would take seconds per MiB. */
void shoal_fill_words(u64 *dst, u64 value, u64 nwords);
/* Index of the first word != value, or nwords when all equal. */
u64 shoal_find_mismatch(const u64 *src, u64 value, u64 nwords);

u64 shoal_mix64(u64 x);

void *memset(void *dst, int c, u64 n);
void *memcpy(void *dst, const void *src, u64 n);
int memcmp(const void *a, const void *b, u64 n);
u64 strlen(const char *s);

#endif
