/* gcg's AMX kernels (amx_linear.c) with the tile unit computed in software, so that the kernels'
 * own work (packing x and w into tile order, the walk over blocks, panels, chunks and spans of
 * k, the accumulators kept between spans, the epilogues, the attention's packing and softmax)
 * can be tested on a CPU without AMX: `GCG_SOFT_AMX=1` sends the products and attentions that
 * would take the AMX kernels to these copies (src/nn/linear.rs), on any CPU with AVX-512 and
 * AVX512-BF16. Slower than the unit (each tile product is 256 vdpbf16ps), never a default.
 *
 * This file compiles amx_linear.c once more with its exported names given a `soft` prefix and
 * the six tile intrinsics it uses replaced by the functions below, which act on eight tiles of
 * 16 rows × 64 bytes kept per thread (the tile registers are per thread too). They follow the
 * instructions' definitions (Intel's ISA extensions reference, TILELOADD, TILESTORED,
 * TILEZERO, TDPBF16PS):
 *
 *     tdpbf16ps c, a, b:  c[m][n] += a[m].bf16[2j]·b[j].bf16[2n] + a[m].bf16[2j+1]·b[j].bf16[2n+1]
 *                          summed over the 16 pairs j of a row of a, in f32,
 *
 * computed per row of c as 16 vdpbf16ps of a broadcast pair of a's row and b's row j (the
 * instruction's lane n: exactly the pair product above). Both instructions treat subnormal
 * inputs as zero and flush subnormal results; the order of the two products of a pair within
 * one f32 sum may differ from the unit's, which the kernels' tests allow for as they allow for
 * oneDNN's. Only the configuration the kernels load (palette 1, every tile 16 × 64 bytes) is
 * taken; another stops the process with a message, as a fault would on the unit. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SOFT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512dq")))

/* This thread's eight tiles and whether a configuration is loaded. */
static __thread uint8_t soft_tiles[8][16 * 64] __attribute__((aligned(64)));
static __thread int soft_configured;

static void soft_fault(const char *what) {
    fprintf(stderr, "gcg's software AMX tiles (GCG_SOFT_AMX): %s\n", what);
    abort();
}

/* TILELOADCONFIG of the 64-byte configuration (palette, start row, colsb[16] at byte 16,
 * rows[16] at byte 48): only palette 1 with tiles 0-7 all 16 × 64 bytes is taken. */
static void soft_tile_loadconfig(const void *config) {
    const uint8_t *c = config;
    if (c[0] != 1 || c[1] != 0) soft_fault("a configuration other than palette 1 from row 0");
    for (int t = 0; t < 8; t++) {
        uint16_t colsb;
        memcpy(&colsb, c + 16 + 2 * t, 2);
        if (colsb != 64 || c[48 + t] != 16) soft_fault("a tile other than 16 rows of 64 bytes");
    }
    memset(soft_tiles, 0, sizeof soft_tiles);
    soft_configured = 1;
}

static void soft_tile_release(void) {
    memset(soft_tiles, 0, sizeof soft_tiles);
    soft_configured = 0;
}

static inline uint8_t *soft_tile(int t) {
    if (!soft_configured) soft_fault("a tile instruction before a configuration was loaded");
    return soft_tiles[t];
}

/* TILELOADD: 16 rows of 64 bytes from `base`, `stride` bytes apart. */
static void soft_tile_loadd(int t, const void *base, long stride) {
    uint8_t *tile = soft_tile(t);
    for (int r = 0; r < 16; r++) memcpy(tile + 64 * r, (const uint8_t *)base + r * stride, 64);
}

/* TILESTORED: the tile's 16 rows of 64 bytes to `base`, `stride` bytes apart. */
static void soft_tile_stored(int t, void *base, long stride) {
    const uint8_t *tile = soft_tile(t);
    for (int r = 0; r < 16; r++) memcpy((uint8_t *)base + r * stride, tile + 64 * r, 64);
}

static void soft_tile_zero(int t) { memset(soft_tile(t), 0, 16 * 64); }

/* TDPBF16PS c, a, b (see the top of this file): the 16 rows of c in registers, b's 16 rows j
 * taken in turn, each times the broadcast pair j of every row of a. */
SOFT_TARGET static void soft_tile_dpbf16ps(int c, int a, int b) {
    float *cm = (float *)soft_tile(c);
    const uint32_t *am = (const uint32_t *)soft_tile(a);
    const uint8_t *bm = soft_tile(b);
    __m512 acc[16];
    for (int m = 0; m < 16; m++) acc[m] = _mm512_load_ps(cm + 16 * m);
    for (int j = 0; j < 16; j++) {
        __m512bh bj = (__m512bh)_mm512_load_si512((const void *)(bm + 64 * j));
        for (int m = 0; m < 16; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32((int)am[16 * m + j]), bj);
    }
    for (int m = 0; m < 16; m++) _mm512_store_ps(cm + 16 * m, acc[m]);
}

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) soft_tile_loadconfig(config)
#define _tile_release() soft_tile_release()
#define _tile_loadd(t, base, stride) soft_tile_loadd((t), (base), (stride))
#define _tile_stored(t, base, stride) soft_tile_stored((t), (base), (stride))
#define _tile_zero(t) soft_tile_zero(t)
#define _tile_dpbf16ps(c, a, b) soft_tile_dpbf16ps((c), (a), (b))

/* 1 when this CPU and OS run the code above and amx_linear.c's vector code: AVX-512 F, DQ, BW
 * and VL, AVX512-BF16, and the OS saving the vector state (XCR0). No tile state is asked for.
 * Asked once; kept. */
static int soft_state = -1;
int gcg_soft_amx_available(void) {
    int s = __atomic_load_n(&soft_state, __ATOMIC_ACQUIRE);
    if (s >= 0) return s;
    unsigned a, b, c, d, a1, b1, c1, d1;
    int ok = 0;
    if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 27)) && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
        (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31)) &&
        __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5))) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        ok = (lo & 0xe6) == 0xe6;
    }
    __atomic_store_n(&soft_state, ok, __ATOMIC_RELEASE);
    return ok;
}

/* amx_linear.c's exported names, prefixed so that both builds link into one binary. */
#define GCG_SOFT_TILES 1
#define gcg_amx_available gcg_soft_amx_available
#define gcg_amx_linear gcg_soft_amx_linear
#define gcg_amx_linear_x3 gcg_soft_amx_linear_x3
#define gcg_amx_peak gcg_soft_amx_peak
#define gcg_amx_stream_peak gcg_soft_amx_stream_peak
#define gcg_attention gcg_soft_attention
#define gcg_avx512_attention_available gcg_soft_avx512_attention_available
#include "amx_linear.c"
