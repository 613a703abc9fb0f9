/* gcg's own bf16 fully connected layer on Intel AMX (the tile matrix unit of Sapphire Rapids
 * and later Xeons), with the same contract as gcg_onednn_linear in onednn_matmul.c:
 *
 *     y [m, n] = residual + gate ⊙ act(x [m, k] · w [n, k]ᵀ + bias [n])
 *
 * x and w bf16 row-major, accumulation in f32, y f32 or bf16. Debian's oneDNN 2.6 reaches about
 * a third of this unit's peak on the ViT's and T5's shapes (and much less when m is not a
 * multiple of its blocking, as the ViT's 4 × 257 rows are not); this kernel is written for
 * those shapes.
 *
 * How: x is first copied into tile order (32 rows at a time, each 32-wide step of k two 1 KB
 * tiles; rows past m are zeros), shared by the threads. OpenMP threads then split the output
 * columns. Each packs a panel of w's rows (~1 MB, so that it stays in L2) into the unit's "VNNI"
 * layout (a 16 × 16 transpose of 32-bit pairs per tile, done with AVX-512 shuffles) and sweeps
 * x's row blocks: four 16 × 16 f32 accumulator tiles per pair of 16-column tiles, each pair's
 * accumulators kept in their tiles over the panel's whole span of k (x's block and the pair's
 * packed weights both read from L2). The finished accumulators go through a small f32 buffer
 * where the epilogue (bias, activation, gate, residual, rounding to bf16) is applied 16 columns
 * at a time, so any m and n work (rows and columns past the end are computed as padding and
 * never written). Past
 * k = 2048 the panel keeps 256 columns and k is walked in spans of 64 steps, every row block's
 * accumulators kept between spans. k must be a multiple of 32 (the caller falls back to oneDNN
 * otherwise).
 *
 * On the Xeon this was written on (2 cores): 1.6–2.3 TFLOP/s on the ViT-g's and T5's shapes
 * against 1.1–1.3 for Debian's oneDNN 2.6 with the same arguments (the unit's peak there: 3.4
 * TFLOP/s per core, measured with products alone in a loop).
 *
 * gcg_amx_linear_x3 computes f32 products on the same unit, each f32 operand taken as the sum of
 * two bf16 numbers (see split_bf16 below), for gcg's matmul precision "high"; gcg_attention
 * (at the end) the ViT's attention, bf16 on the AMX unit or f32/bf16 on AVX-512 alone.
 *
 * Compiled only for x86-64 with a compiler that knows the AMX intrinsics (build.rs); used only
 * when the CPU reports AMX-BF16 and Linux grants the tile state (arch_prctl). amx_soft.c
 * compiles this file once more with the tile instructions computed in software, for testing
 * these kernels on CPUs without AMX (`GCG_SOFT_AMX=1`). */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>

#define TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx512dq")))
/* The AVX-512 part alone: helpers shared with the attention for CPUs without AMX (at the end). */
#define TARGET512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512dq")))

/* glibc's vector math (libmvec, glibc ≥ 2.35): erf and tanh on 16 floats. */
extern __m512 _ZGVeN16v_erff(__m512);
extern __m512 _ZGVeN16v_tanhf(__m512);

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#ifndef GCG_SOFT_TILES /* amx_soft.c, which includes this file, has its own check */
static int amx_state = -1; /* -1 unknown, 0 unusable, 1 usable */

/* 1 when this process may use AMX-BF16: the CPU has it (CPUID 7.0:EDX bits 22 and 24) and the
 * kernel grants the tile data state. Asked once; the answer is kept. */
int gcg_amx_available(void) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (s >= 0) return s;
    unsigned a, b, c, d;
    int ok = 0;
    /* AMX-BF16, AMX-TILE; AVX-512 F, DQ, BW, VL. */
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) && (d & (1u << 24)) && (b & (1u << 16)) &&
        (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31))) {
        /* AVX-512 BF16 (CPUID 7.1:EAX bit 5) for the rounding to bf16 in the epilogue. */
        unsigned a1, b1, c1, d1;
        if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5)))
            ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    __atomic_store_n(&amx_state, ok, __ATOMIC_RELEASE);
    return ok;
}
#endif

/* A buffer of at least `bytes` (64-byte aligned) kept by this thread for its next calls, or
 * NULL when memory ran out. The packed operands are megabytes: allocated afresh on every call
 * they cost page faults and the zeroing of new pages (measured at ~3% of a bf16 answer). Slot
 * 0: the packed rows of x (the calling thread); slot 1: a thread's packed panel of w; slot 2:
 * its accumulators between spans of k; slot 3: a thread's buffers for attention. */
static void *scratch(int slot, size_t bytes) {
    static __thread void *buf[4];
    static __thread size_t cap[4];
    if (cap[slot] < bytes) {
        free(buf[slot]);
        size_t size = (bytes + 63) / 64 * 64;
        buf[slot] = aligned_alloc(64, size);
        cap[slot] = buf[slot] ? size : 0;
    }
    return buf[slot];
}

/* The tile configuration: palette 1, eight 16-row tiles of 64 bytes per row. */
typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* Sets this thread's tiles to eight 16 × 64-byte tiles (released by _tile_release). */
TARGET static inline void load_tile_config(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* Transposes a 16 × 16 block of 32-bit values: row i of `src` (stride `ss` elements) becomes
 * column i of `dst` (16 × 16, contiguous). */
TARGET512 static inline void transpose16(const uint32_t *src, long ss, uint32_t *dst) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(src + i * ss));
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* Lane q of r[4g + j] now holds column 4q + j of rows 4g..4g+3. Gather the four lanes of
     * each column: rows 0-7 and 8-15 first, then both halves. */
    for (int g = 0; g < 16; g += 8) {
        for (int j = 0; j < 4; j++) {
            t[g + j] = _mm512_shuffle_i32x4(r[g + j], r[g + 4 + j], 0x88);
            t[g + 4 + j] = _mm512_shuffle_i32x4(r[g + j], r[g + 4 + j], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    }
    /* r[c] is column c. */
    for (int i = 0; i < 16; i++) _mm512_storeu_si512((void *)(dst + 16 * i), r[i]);
}

/* Packs rows n0 .. n0 + 32·pairs of w [n, k] (rows past n are zeros), steps t0 .. t0 + ts of
 * 32 along k, into the layout of the unit's B tiles: for each pair of 16-row groups, each step
 * s, each group j, a 16 × 16 block of 32-bit values whose row kk holds
 * (w[row][32s + 2kk], w[row][32s + 2kk + 1]) for the group's 16 rows. */
TARGET static void pack_panel(const uint16_t *w, long n, long k, long n0, long pairs, long t0, long ts,
                              uint32_t *pack) {
    long words = k / 2;
    const uint32_t *w32 = (const uint32_t *)w;
    uint32_t pad[256] __attribute__((aligned(64)));
    for (long p = 0; p < pairs; p++)
        for (int j = 0; j < 2; j++) {
            long r0 = n0 + 32 * p + 16 * j, valid = n - r0;
            valid = valid < 0 ? 0 : valid > 16 ? 16 : valid;
            for (long s = 0; s < ts; s++) {
                uint32_t *dst = pack + ((p * ts + s) * 2 + j) * 256;
                const uint32_t *src = w32 + r0 * words + 16 * (t0 + s);
                if (valid == 16) {
                    /* These rows' values 8 steps on: each row is its own stream, too many and
                     * too short (a few KB) for the hardware's prefetchers. */
                    if (s + 8 < ts)
                        for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(src + r * words + 16 * 8), _MM_HINT_T0);
                    transpose16(src, words, dst);
                } else {
                    memset(pad, 0, sizeof pad);
                    for (long r = 0; r < valid; r++) memcpy(pad + 16 * r, src + r * words, 64);
                    transpose16(pad, 16, dst);
                }
            }
        }
}

/* f32 operands as sums of two bf16 numbers ("bf16x3", what torch's matmul precision "high"
 * names): v = hi + lo + r with hi = bf16(v), lo = bf16(v - hi), rounded to nearest, so that
 * |v - hi| ≤ 2⁻⁸|v| and |r| ≤ 2⁻¹⁷|v|. The product is taken over a reduction three times as long,
 * x's values as hi, lo, hi against w's as hi, hi, lo: x·w ≈ hi·hi + lo·hi + hi·lo, each term exact
 * in f32 (8-bit by 8-bit mantissas) and summed in f32. Left out: lo·lo (within 2⁻¹⁶ of the
 * product) and the remainders (2⁻¹⁷ each), against f32's 2⁻²⁴ per rounding.
 *
 * Infinities and NaN: where hi is not finite, lo is 0 and the hi that meets the other operand's
 * lo is 0 too (`hf`), so that only hi·hi carries them and the result is what f32 gives (an
 * infinite x against w = 0 or a lo of the other sign would otherwise give NaN). A finite value
 * that rounds past bf16's largest (from about 3.396e38) becomes infinite, and subnormal values
 * (below 1.2e-38) count as 0, as the unit reads them.
 *
 * split_bf16 gives 32 consecutive values' hi, lo and hf. */
TARGET static inline void split_bf16(const float *src, __m512i *hi, __m512i *lo, __m512i *hf) {
    __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
    __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
    __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    /* Finite hi: h - h is 0, not NaN. */
    __mmask16 fa = _mm512_cmp_ps_mask(_mm512_sub_ps(ha, ha), _mm512_setzero_ps(), _CMP_EQ_OQ);
    __mmask16 fb = _mm512_cmp_ps_mask(_mm512_sub_ps(hb, hb), _mm512_setzero_ps(), _CMP_EQ_OQ);
    __m512 da = _mm512_maskz_sub_ps(fa, a, ha), db = _mm512_maskz_sub_ps(fb, b, hb);
    *hi = h;
    *lo = (__m512i)_mm512_cvtne2ps_pbh(db, da);
    *hf = _mm512_maskz_mov_epi16((__mmask32)fa | ((__mmask32)fb << 16), h);
}

/* pack_panel for f32 w [n, k] seen as bf16 rows of length 3k: each 32-wide step s of k becomes
 * the steps 3s, 3s + 1, 3s + 2 of that long reduction, holding hi, hf and lo (against x's hi, lo,
 * hf: see pack_rows3). t0 and ts count the long reduction's steps (multiples of 3), so w is read
 * once per call. */
TARGET static void pack_panel3(const float *w, long n, long k, long n0, long pairs, long t0, long ts, uint32_t *pack) {
    uint32_t hi[256] __attribute__((aligned(64))), lo[256] __attribute__((aligned(64))), hf[256] __attribute__((aligned(64)));
    for (long p = 0; p < pairs; p++)
        for (int j = 0; j < 2; j++) {
            long r0 = n0 + 32 * p + 16 * j, valid = n - r0;
            valid = valid < 0 ? 0 : valid > 16 ? 16 : valid;
            for (long s = 0; s < ts; s += 3) {
                long at = 32 * ((t0 + s) / 3);
                for (long r = 0; r < 16; r++) {
                    __m512i h = _mm512_setzero_si512(), l = h, f = h;
                    if (r < valid) split_bf16(w + (r0 + r) * k + at, &h, &l, &f);
                    _mm512_store_si512((void *)(hi + 16 * r), h);
                    _mm512_store_si512((void *)(lo + 16 * r), l);
                    _mm512_store_si512((void *)(hf + 16 * r), f);
                }
                uint32_t *dst = pack + ((p * ts + s) * 2 + j) * 256;
                transpose16(hi, 16, dst);
                transpose16(hf, 16, dst + 512);
                transpose16(lo, 16, dst + 1024);
            }
        }
}

/* GELU (erf) for outputs rounded to bf16: 0.5 v (1 + erf(v / √2)), erf by Abramowitz & Stegun's
 * formula 7.1.26 (for a ≥ 0, erf(a) = 1 - t (p1 + t (p2 + … + t p5)) exp(-a²), t = 1 / (1 + p a),
 * within 1.5e-7 of erf) and exp(-a²) by a range reduction to [-ln2/2, ln2/2], a degree-6 Taylor
 * polynomial and a scaling by 2ⁿ. It costs about half of libmvec's erf (fc1 of the ViT-g: 12%
 * faster with it, all of what GELU cost there) and stays within 4.2e-7 of the exact GELU over
 * [-20, 20], far below bf16's rounding (2⁻⁹ of the value); f32 outputs keep libmvec's erf.
 * 1 + erf(s) is formed as 2 - c for s ≥ 0 and as c for s < 0 (c = 1 - erf(|s|), no
 * cancellation). -a² is clamped at -80: exp's smallest results stay normal numbers (subnormal
 * operands made fc1 1.7x slower) and erf is 1 in f32 long before. */
TARGET512 static inline __m512 gelu_erf_bf16out(__m512 v) {
    __m512 s = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f));
    __m512 a = _mm512_abs_ps(s);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_fmadd_ps(t, _mm512_set1_ps(1.061405429f), _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    /* exp(y), y = -a² ≥ -80: y = n ln2 + r, ln2 in two parts so that n ln2 is exact enough. */
    __m512 y = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a), _mm512_set1_ps(-80.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.4426950408889634f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), y);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094172e-6f), r);
    __m512 q = _mm512_set1_ps(1.0f / 720);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 120));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 24));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 6));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
    __m512 c = _mm512_mul_ps(p, _mm512_scalef_ps(q, n)); /* 1 - erf(a) */
    __mmask16 neg = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 one_plus_erf = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(2.0f), c), neg, c);
    return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), one_plus_erf);
}

typedef struct {
    int out_bf16, act, gate_bf16, residual;
    const float *bias;
    const void *gate;
    void *y;
    long n;
} epi_t;

TARGET static inline __m512 load_any(const void *base, long i, int bf16, __mmask16 mask) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)base + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)base + i);
}

/* Applies the epilogue to rows r0 .. r1 of a finished 32 × 32 block of accumulators (acc, row
 * stride 32; the block's rows start at m0 and its nr columns at n0) and writes them to y. */
TARGET static void epilogue(const epi_t *e, const float *acc, long m0, long r0, long r1, long n0, long nr) {
    for (long r = r0; r < r1; r++)
        for (long h = 0; h < 32 && h < nr; h += 16) {
            long cols = nr - h < 16 ? nr - h : 16;
            __mmask16 mask = (__mmask16)((1u << cols) - 1);
            long col = n0 + h, at = (m0 + r) * e->n + col;
            __m512 v = _mm512_load_ps(acc + r * 32 + h);
            if (e->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, e->bias + col));
            if (e->act == 1 && e->out_bf16) {
                v = gelu_erf_bf16out(v);
            } else if (e->act == 1) {
                __m512 t = _ZGVeN16v_erff(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
                v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), _mm512_add_ps(t, _mm512_set1_ps(1.0f)));
            } else if (e->act == 2) {
                __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
                __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                         _mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v));
                __m512 t = _ZGVeN16v_tanhf(u);
                v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)), _mm512_add_ps(t, _mm512_set1_ps(1.0f)));
            } else if (e->act == 3) {
                v = _mm512_max_ps(v, _mm512_setzero_ps());
            }
            if (e->gate) v = _mm512_mul_ps(v, load_any(e->gate, at, e->gate_bf16, mask));
            if (e->residual) v = _mm512_add_ps(v, load_any(e->y, at, e->out_bf16, mask));
            if (e->out_bf16)
                _mm256_mask_storeu_epi16((uint16_t *)e->y + at, mask, (__m256i)_mm512_cvtneps_pbh(v));
            else
                _mm512_mask_storeu_ps((float *)e->y + at, mask, v);
        }
}

/* A finished block whose epilogue is still to run, a few rows at a time between the tile
 * products of the next blocks: the vector work of the epilogue (the bias, GELU's erf, the
 * rounding and the writes to y) then overlaps the matrix unit's instead of leaving it idle. */
typedef struct {
    const float *acc;
    long m0, mr, c0, nr, done;
} pending_t;

/* Runs the pending block's epilogue for up to `rows` more rows. */
TARGET static inline void run_pending(const epi_t *e, pending_t *q, long rows) {
    long r1 = q->done + rows < q->mr ? q->done + rows : q->mr;
    if (q->done < r1) {
        epilogue(e, q->acc, q->m0, q->done, r1, q->c0, q->nr);
        q->done = r1;
    }
}

/* Packs x's rows 32 at a time (blocks b0 .. b1; rows past m are zeros) into the layout the
 * kernel loads: for each block, each 32-wide step s of k, its two 16-row tiles of 1 KB, so that
 * every tile load reads 1 KB of consecutive memory. */
TARGET static void pack_rows(const uint16_t *x, long m, long k, long b0, long b1, uint16_t *pack) {
    long steps = k / 32;
    for (long b = b0; b < b1; b++)
        for (long s = 0; s < steps; s++)
            for (int t = 0; t < 2; t++) {
                uint16_t *dst = pack + ((b * steps + s) * 2 + t) * 512;
                for (long r = 0; r < 16; r++) {
                    long row = 32 * b + 16 * t + r;
                    __m512i v = row < m ? _mm512_loadu_si512((const void *)(x + row * k + 32 * s)) : _mm512_setzero_si512();
                    _mm512_store_si512((void *)(dst + 32 * r), v);
                }
            }
}

/* pack_rows for f32 x [m, k] seen as bf16 rows of length 3k: each 32-wide step s of k becomes
 * the steps 3s, 3s + 1, 3s + 2 of that long reduction, holding hi, lo and hf. */
TARGET static void pack_rows3(const float *x, long m, long k, long b0, long b1, uint16_t *pack) {
    long steps = k / 32;
    for (long b = b0; b < b1; b++)
        for (long s = 0; s < steps; s++)
            for (int t = 0; t < 2; t++)
                for (long r = 0; r < 16; r++) {
                    long row = 32 * b + 16 * t + r;
                    __m512i part[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
                    if (row < m) split_bf16(x + row * k + 32 * s, &part[0], &part[1], &part[2]);
                    for (int seg = 0; seg < 3; seg++) {
                        uint16_t *dst = pack + ((b * 3 * steps + 3 * s + seg) * 2 + t) * 512;
                        _mm512_store_si512((void *)(dst + 32 * r), part[seg]);
                    }
                }
}

/* One thread's share: output columns n_begin .. n_end (multiples of 32 apart, except at n),
 * with x already packed by pack_rows (k the packed reduction: 3 times the real one for f32
 * operands, w_f32, packed by pack_rows3 and pack_panel3). */
TARGET static int thread_part(long m, long n, long k, const uint16_t *xp, const void *w, int w_f32, const epi_t *e,
                              long n_begin, long n_end) {
    long steps = k / 32, blocks = (m + 31) / 32;
    /* Columns per panel and steps of k per span: a panel's packed weights for one span
     * (columns × span × 32 bf16) fill ~1 MB of L2. A short reduction is one span with the
     * widest panel that fits; a long one (the ViT's 6144) keeps 256 columns, so that x is read
     * again for fewer panels, and walks k in spans of 64 steps, every row block's accumulators
     * waiting in `part` between spans. */
    long panel = (512L * 1024 / k) / 32 * 32, span = steps;
    if (panel < 256) {
        panel = 256;
        span = (1L << 20) / (panel * 64);
        if (span > steps) span = steps;
    }
    /* f32 operands as bf16 pairs: a span holds whole steps of the real k (3 packed steps). */
    if (w_f32 && span < steps) span = span / 3 * 3;
    long spans = (steps + span - 1) / span;
    uint32_t *pack = scratch(1, (size_t)(panel / 32) * span * 512 * 4);
    /* Each pair's accumulators stay in their tiles over the whole span (x's block and the
     * pair's weights read from L2), where the span was walked in chunks of 16 steps with x's
     * chunk (32 KB) kept in L1 and every pair's accumulators saved and reloaded after each
     * chunk: on the ViT-g's shapes (weights in memory, 2 threads) 7–31% faster with memory in
     * 4 KB pages, the same within noise in huge pages (README). */
    float *part = scratch(2, (size_t)(spans > 1 ? blocks : 1) * (panel / 32) * 4096);
    if (!pack || !part) return -2;
    load_tile_config();
    /* Two blocks of finished accumulators: one whose epilogue is pending, one being written. */
    float acc[2][32 * 32] __attribute__((aligned(64)));
    int flip = 0;
    pending_t q = {acc[0], 0, 0, 0, 0, 0};
    for (long p0 = n_begin; p0 < n_end; p0 += panel) {
        long cols = n_end - p0 < panel ? n_end - p0 : panel;
        long pairs = (cols + 31) / 32;
        for (long t0 = 0; t0 < steps; t0 += span) {
            long ts = steps - t0 < span ? steps - t0 : span;
            if (w_f32)
                pack_panel3((const float *)w, n, k / 3, p0, pairs, t0, ts, pack);
            else
                pack_panel((const uint16_t *)w, n, k, p0, pairs, t0, ts, pack);
            for (long m0 = 0; m0 < m; m0 += 32) {
                const uint16_t *a = xp + (m0 / 32) * steps * 1024;
                float *kept = part + (spans > 1 ? (m0 / 32) * (panel / 32) * 1024 : 0);
                long mr = m - m0 < 32 ? m - m0 : 32;
                for (long p = 0; p < pairs; p++) {
                    const uint32_t *b = pack + p * ts * 512;
                    float *keep = kept + p * 1024;
                    if (t0 == 0) {
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                    } else {
                        _tile_loadd(0, keep, 64);
                        _tile_loadd(1, keep + 256, 64);
                        _tile_loadd(2, keep + 512, 64);
                        _tile_loadd(3, keep + 768, 64);
                    }
                    /* The block's last span: its rows of y on their way into the cache
                     * for writing (and reading, with a residual) while the products run. */
                    if (t0 + ts == steps) {
                        long bytes = e->out_bf16 ? 2 : 4;
                        const char *yp = (const char *)e->y + (m0 * e->n + p0 + 32 * p) * bytes;
                        for (long r = 0; r < mr; r++) {
                            _mm_prefetch(yp + r * e->n * bytes, _MM_HINT_ET0);
                            if (bytes == 4) _mm_prefetch(yp + r * e->n * bytes + 64, _MM_HINT_ET0);
                        }
                    }
                    /* The pending epilogue's rows, spread over this span's steps. */
                    long per = (32 + ts - 1) / ts;
                    for (long s = t0; s < t0 + ts; s++) {
                        /* Loads interleaved with the products that can already run. */
                        _tile_loadd(6, b + (s - t0) * 512, 64);
                        _tile_loadd(4, a + s * 1024, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_loadd(7, b + (s - t0) * 512 + 256, 64);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_loadd(5, a + s * 1024 + 512, 64);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                        if (q.done < q.mr) run_pending(e, &q, per);
                    }
                    if (t0 + ts < steps) {
                        _tile_stored(0, keep, 64);
                        _tile_stored(1, keep + 256, 64);
                        _tile_stored(2, keep + 512, 64);
                        _tile_stored(3, keep + 768, 64);
                        continue;
                    }
                    /* The block before must be done before its buffer is reused. */
                    run_pending(e, &q, 32);
                    float *out = acc[flip];
                    flip ^= 1;
                    _tile_stored(0, out, 128);
                    _tile_stored(1, out + 16, 128);
                    _tile_stored(2, out + 16 * 32, 128);
                    _tile_stored(3, out + 16 * 32 + 16, 128);
                    long c0 = p0 + 32 * p, nr = n_end - c0 < 32 ? n_end - c0 : 32;
                    q = (pending_t){out, m0, mr, c0, nr, 0};
                }
            }
        }
    }
    run_pending(e, &q, 32);
    _tile_release();
    return 0;
}

/* The product of bf16 x and w, or (x3) of f32 x and w as bf16 pairs; see gcg_amx_linear. */
static int amx_linear(int x3, int out_bf16, long m, long n, long k, const void *x, const void *w, const float *bias,
                      int act, const void *gate, int gate_bf16, int residual, void *y) {
    if (k % 32 != 0 || k == 0 || m == 0 || n == 0 || !gcg_amx_available()) return -1;
    epi_t e = {out_bf16, act, gate_bf16, residual, bias, gate, y, n};
    long units = (n + 31) / 32, blocks = (m + 31) / 32, kp = x3 ? 3 * k : k;
    uint16_t *xp = scratch(0, (size_t)blocks * 32 * kp * 2);
    if (!xp) return -2;
    int status = 0;
#pragma omp parallel
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (x3)
            pack_rows3((const float *)x, m, k, blocks * t / nt, blocks * (t + 1) / nt, xp);
        else
            pack_rows((const uint16_t *)x, m, k, blocks * t / nt, blocks * (t + 1) / nt, xp);
#pragma omp barrier
        long u0 = units * t / nt, u1 = units * (t + 1) / nt;
        long b = u0 * 32, end = u1 * 32 < n ? u1 * 32 : n;
        if (b < end) {
            int st = thread_part(m, n, kp, xp, w, x3, &e, b, end);
            if (st) {
#pragma omp atomic write
                status = st;
            }
        }
    }
    return status;
}

/* Same arguments as gcg_onednn_linear. Returns 0 when done, -1 when this kernel does not
 * apply (f32 input, no AMX, k not a multiple of 32), -2 when memory ran out. */
int gcg_amx_linear(int in_bf16, int out_bf16, long m, long n, long k, const void *x, const void *w, const float *bias,
                   int act, const void *gate, int gate_bf16, int residual, void *y) {
    if (!in_bf16) return -1;
    return amx_linear(0, out_bf16, m, n, k, x, w, bias, act, gate, gate_bf16, residual, y);
}

/* The same for f32 x and w, each value taken as a pair of bf16 numbers (see split_bf16): about
 * 16 bits of each operand's mantissa instead of 24, three times the unit's work of a bf16
 * product. Returns -1 for bf16 input, as gcg_amx_linear does for f32. */
int gcg_amx_linear_x3(int in_bf16, int out_bf16, long m, long n, long k, const void *x, const void *w,
                      const float *bias, int act, const void *gate, int gate_bf16, int residual, void *y) {
    if (in_bf16) return -1;
    return amx_linear(1, out_bf16, m, n, k, x, w, bias, act, gate, gate_bf16, residual, y);
}

/* ---- Attention on the AMX unit (bf16, no bias) ------------------------------------------------
 *
 *     out [b, lq, h, dv] = softmax(scale · q kᵀ) v      per batch b and head h,
 *
 * q [b, h, lq, d], k [b, h, lk, d], v [b, h, lk, dv] bf16 with any strides whose last is 1 (the
 * heads of a packed qkv projection are read in place), scores and softmax in f32, the
 * probabilities rounded to bf16 for the second product, which accumulates in f32 (as oneDNN's
 * path in onednn_matmul.c does). The (batch, head) pairs go to the threads; each works 32 query
 * rows at a time: their scores [32, lk] by 2 × 2 accumulator tiles over k's VNNI packing, the
 * softmax of those rows (glibc's vector exp), then their share of the output from the
 * probabilities (loaded as they are) and v's packing. Everything one pair needs stays in L2.
 * d and dv are padded to multiples of 32 with zeros, lk too (probabilities of padded keys are
 * 0). */

extern __m512 _ZGVeN16v_expf(__m512);


/* 32 bf16 values from src (n valid, the rest zeros). */
TARGET512 static inline __m512i load32(const uint16_t *src, long n) {
    if (n >= 32) return _mm512_loadu_si512((const void *)src);
    if (n <= 0) return _mm512_setzero_si512();
    return _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), src);
}

/* 16 bf16 values from src (n valid) widened to the low halves of 16 32-bit lanes. */
TARGET512 static inline __m512i load16_wide(const uint16_t *src, long n) {
    if (n <= 0) return _mm512_setzero_si512();
    __mmask16 m = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src));
}

TARGET static void attention_pair(long lq, long lk, long d, long dv, const uint16_t *q, long q_row, const uint16_t *k,
                                 long k_row, const uint16_t *v, long v_row, float scale, uint16_t *out, long o_row,
                                 char *mem) {
    long ds = (d + 31) / 32, lp = (lk + 31) / 32 * 32, vs = lp / 32, dvp = (dv + 31) / 32 * 32;
    /* Scratch: k packed [lp / 16 groups][ds steps][256 u32]; v packed [vs steps][dvp / 16
     * groups][256 u32]; q's block [32][32 ds] bf16; scores [32][lp] f32; probabilities [32][lp]
     * bf16; one finished block [32][32] f32. */
    uint32_t *kp = (uint32_t *)mem;
    uint32_t *vp = kp + (lp / 16) * ds * 256;
    uint16_t *qb = (uint16_t *)(vp + vs * (dvp / 16) * 256);
    float *sc = (float *)(qb + 32 * 32 * ds);
    uint16_t *pb = (uint16_t *)(sc + 32 * lp);
    float *blk = (float *)(pb + 32 * lp);
    uint32_t pad[256] __attribute__((aligned(64)));
    /* k: B tiles of the scores (16 keys × 32 values of d per tile, as pack_panel). */
    for (long g = 0; g < lp / 16; g++)
        for (long s = 0; s < ds; s++) {
            for (long r = 0; r < 16; r++) {
                long key = 16 * g + r;
                __m512i x = key < lk ? load32(k + key * k_row + 32 * s, d - 32 * s) : _mm512_setzero_si512();
                _mm512_store_si512((void *)(pad + 16 * r), x);
            }
            transpose16(pad, 16, kp + (g * ds + s) * 256);
        }
    /* v: B tiles of the output (row kk: keys 2kk and 2kk + 1 of the step, 16 columns of dv). */
    for (long s = 0; s < vs; s++)
        for (long j = 0; j < dvp / 16; j++) {
            uint32_t *dst = vp + (s * (dvp / 16) + j) * 256;
            for (long kk = 0; kk < 16; kk++) {
                long k0 = 32 * s + 2 * kk, c0 = 16 * j;
                __m512i a = k0 < lk ? load16_wide(v + k0 * v_row + c0, dv - c0) : _mm512_setzero_si512();
                __m512i b = k0 + 1 < lk ? load16_wide(v + (k0 + 1) * v_row + c0, dv - c0) : _mm512_setzero_si512();
                _mm512_store_si512((void *)(dst + 16 * kk), _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
            }
        }
    for (long m0 = 0; m0 < lq; m0 += 32) {
        long mr = lq - m0 < 32 ? lq - m0 : 32;
        /* q's 32 rows (zeros past lq and past d). */
        for (long r = 0; r < 32; r++)
            for (long s = 0; s < ds; s++) {
                __m512i x = r < mr ? load32(q + (m0 + r) * q_row + 32 * s, d - 32 * s) : _mm512_setzero_si512();
                _mm512_store_si512((void *)(qb + r * 32 * ds + 32 * s), x);
            }
        /* Scores: 32 rows × 32 keys per block. */
        for (long n0 = 0; n0 < lp; n0 += 32) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long s = 0; s < ds; s++) {
                _tile_loadd(6, kp + ((n0 / 16) * ds + s) * 256, 64);
                _tile_loadd(4, qb + 32 * s, 64 * ds);
                _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(7, kp + ((n0 / 16 + 1) * ds + s) * 256, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_loadd(5, qb + 16 * 32 * ds + 32 * s, 64 * ds);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, sc + n0, lp * 4);
            _tile_stored(1, sc + n0 + 16, lp * 4);
            _tile_stored(2, sc + 16 * lp + n0, lp * 4);
            _tile_stored(3, sc + 16 * lp + n0 + 16, lp * 4);
        }
        /* Softmax of each row over its lk keys, in f32; probabilities to bf16 (0 past lk and in
         * rows past lq). */
        __m512 vscale = _mm512_set1_ps(scale);
        for (long r = 0; r < 32; r++) {
            float *row = sc + r * lp;
            uint16_t *pr = pb + r * lp;
            if (r >= mr) {
                memset(pr, 0, lp * 2);
                continue;
            }
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (long c = 0; c < lk; c += 16) {
                __mmask16 m = lk - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (lk - c)) - 1);
                __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + c), vscale);
                _mm512_mask_storeu_ps(row + c, m, x);
                mx = _mm512_mask_max_ps(mx, m, mx, x);
            }
            float top = _mm512_reduce_max_ps(mx);
            __m512 vtop = _mm512_set1_ps(top), sum = _mm512_setzero_ps();
            for (long c = 0; c < lk; c += 16) {
                __mmask16 m = lk - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (lk - c)) - 1);
                __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + c), vtop));
                e = _mm512_maskz_mov_ps(m, e);
                _mm512_mask_storeu_ps(row + c, m, e);
                sum = _mm512_add_ps(sum, e);
            }
            __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
            for (long c = 0; c < lp; c += 16) {
                __mmask16 m = lk - c >= 16 ? (__mmask16)0xffff : lk - c <= 0 ? 0 : (__mmask16)((1u << (lk - c)) - 1);
                __m512 p = _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, row + c), inv);
                _mm256_storeu_si256((__m256i *)(pr + c), (__m256i)_mm512_cvtneps_pbh(p));
            }
        }
        /* Output: 32 rows × 32 columns of dv per block, the keys in steps of 32. */
        for (long c0 = 0; c0 < dvp; c0 += 32) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long s = 0; s < vs; s++) {
                _tile_loadd(6, vp + (s * (dvp / 16) + c0 / 16) * 256, 64);
                _tile_loadd(4, pb + 32 * s, lp * 2);
                _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(7, vp + (s * (dvp / 16) + c0 / 16 + 1) * 256, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_loadd(5, pb + 16 * lp + 32 * s, lp * 2);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, blk, 128);
            _tile_stored(1, blk + 16, 128);
            _tile_stored(2, blk + 16 * 32, 128);
            _tile_stored(3, blk + 16 * 32 + 16, 128);
            long cols = dv - c0 < 32 ? dv - c0 : 32;
            for (long r = 0; r < mr; r++)
                for (long h0 = 0; h0 < cols; h0 += 16) {
                    long n = cols - h0 < 16 ? cols - h0 : 16;
                    __mmask16 m = (__mmask16)((1u << n) - 1);
                    __m512 x = _mm512_load_ps(blk + r * 32 + h0);
                    _mm256_mask_storeu_epi16(out + (m0 + r) * o_row + c0 + h0, m, (__m256i)_mm512_cvtneps_pbh(x));
                }
        }
    }
}

/* The arguments of a gcg_attention call. */
typedef struct {
    int bf16;
    long b, h, lq, lk, d, dv;
    const void *q, *k, *v;
    const long *sq, *sk, *sv;
    float scale;
    void *out;
} attention_t;

/* Runs share(a, t, nt, mem) on each OpenMP thread t of nt, mem being `bytes` of the thread's
 * scratch slot 3 (a thread takes the (batch, head) pairs t, t + nt, …). Returns 0, or -2 when
 * memory ran out. */
static int attention_threads(const attention_t *a, size_t bytes,
                             void (*share)(const attention_t *, int, int, char *)) {
    int status = 0;
#pragma omp parallel
    {
        char *mem = scratch(3, bytes);
        if (!mem) {
#pragma omp atomic write
            status = -2;
        } else {
            share(a, omp_get_thread_num(), omp_get_num_threads(), mem);
        }
    }
    return status;
}

/* The scratch bytes of attention_pair for lk keys, head width d and value width dv. */
static size_t amx_attention_bytes(long lk, long d, long dv) {
    long ds = (d + 31) / 32, lp = (lk + 31) / 32 * 32, dvp = (dv + 31) / 32 * 32;
    return (size_t)(lp / 16) * ds * 1024 + (size_t)(lp / 32) * (dvp / 16) * 1024 + (size_t)32 * 32 * ds * 2 +
           (size_t)32 * lp * 4 + (size_t)32 * lp * 2 + 32 * 32 * 4 + 64;
}

/* A thread's share of the AMX attention (bf16). */
TARGET static void amx_attention_share(const attention_t *a, int t, int nt, char *mem) {
    long h = a->h, lq = a->lq, dv = a->dv;
    if (t >= a->b * h) return;
    const uint16_t *q = a->q, *k = a->k, *v = a->v;
    const long *sq = a->sq, *sk = a->sk, *sv = a->sv;
    load_tile_config();
    for (long p = t; p < a->b * h; p += nt) {
        long bi = p / h, hi = p % h;
        attention_pair(lq, a->lk, a->d, dv, q + bi * sq[0] + hi * sq[1], sq[2], k + bi * sk[0] + hi * sk[1], sk[2],
                       v + bi * sv[0] + hi * sv[1], sv[2], a->scale, (uint16_t *)a->out + bi * lq * h * dv + hi * dv,
                       h * dv, mem);
    }
    _tile_release();
}

/* The peak probes' end: the four accumulator tiles to `sums` (4 × 16 × 16 floats), then the
 * tiles released. */
TARGET static void store_sums(float *sums) {
    _tile_stored(0, sums, 64);
    _tile_stored(1, sums + 256, 64);
    _tile_stored(2, sums + 512, 64);
    _tile_stored(3, sums + 768, 64);
    _tile_release();
}

/* The tile unit's bf16 rate, for `gcg bench peak` (src/nn/peak.rs): on the calling thread, four
 * accumulator tiles each take `steps` tile products of all-ones operands (16 × 32 bf16 times
 * 32 × 16), then are written to `sums` (4 × 16 × 16 floats, each 32 · steps when the unit
 * summed right). Returns 0 when done, -1 without AMX. */
TARGET int gcg_amx_peak(long steps, float *sums) {
    if (!gcg_amx_available()) return -1;
    uint16_t ones[16 * 32] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 32; i++) ones[i] = 0x3f80; /* 1.0 in bf16 */
    load_tile_config();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    for (long s = 0; s < steps; s++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    store_sums(sums);
    return 0;
}

/* The tile unit fed from memory, for `gcg bench peak`'s amx_bf16_l1 and amx_bf16_l2: thread_part's
 * inner loop (four accumulator tiles; each step loads two 1 KB tiles of a and two of b, with the
 * four tile products between the loads, in the kernel's order) for `steps` steps, walking a's
 * a_steps and b's b_steps steps of 2 KB cyclically. With both operands sized to fit L1 or L2,
 * the rate is what a kernel whose operands come from there can reach at most. All operands 1:
 * the four tiles' sums (written to `sums`) are each 32 · steps. Returns 0 when done, -1 without
 * AMX. */
TARGET int gcg_amx_stream_peak(long steps, const uint16_t *a, long a_steps, const uint16_t *b, long b_steps, float *sums) {
    if (!gcg_amx_available() || a_steps < 1 || b_steps < 1) return -1;
    load_tile_config();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    long ia = 0, ib = 0;
    for (long s = 0; s < steps; s++) {
        const uint16_t *x = a + ia * 1024, *w = b + ib * 1024;
        _tile_loadd(6, w, 64);
        _tile_loadd(4, x, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, w + 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, x + 512, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        if (++ia == a_steps) ia = 0;
        if (++ib == b_steps) ib = 0;
    }
    store_sums(sums);
    return 0;
}

/* ---- Attention on AVX-512 alone (CPUs without AMX) -------------------------------------------
 *
 * The AVX-512 attention: the AMX attention's contract, f32 (FMA) or bf16 (AVX512-BF16's
 * dot products of pairs, accumulating in f32), for CPUs whose matrix products run on the vector
 * units. oneDNN's path (two batched products and a softmax over the whole batch) writes every
 * score to memory and reads it back twice: at 32 frames a pass the ViT-g's scores are 135 MB of
 * f32. Here one (batch, head) pair at a time per thread, eight query rows at a time: their
 * scores over all keys, the softmax of those rows, then their share of the output, with k and v
 * packed once per pair and every buffer in L2.
 *
 * Both types share one scheme in 32-bit "words": a word is one f32 value, or a pair of
 * neighbouring bf16 values (which one vdpbf16ps lane multiplies and sums). k is packed in groups
 * of 16 keys, each a [words][16] block (word w of 16 keys: one vector), v as [steps][dv] words
 * (a step is one key in f32, two keys in bf16: keys 2j and 2j + 1 interleaved per column), and
 * each block of eight q rows is copied into a zero-padded [8][words] buffer. A score vector is
 * then the sum over words of a broadcast q word times a k vector; an output vector the sum over
 * steps of a broadcast probability word times a v vector. The scores of padded keys are never
 * read; the probabilities of keys past lk are 0 (bf16: the second half of an odd lk's last
 * pair). */

static int avx512_state[2] = {-1, -1}; /* per type (0 f32, 1 bf16): -1 unknown, 0 no, 1 yes */

/* 1 when this CPU and OS run the kernel below for the type (bf16 != 0: bf16): AVX-512 F, DQ,
 * BW and VL (CPUID 7.0:EBX bits 16, 17, 30, 31) and AVX512-BF16 (7.1:EAX bit 5), and the OS
 * saves the vector state (XCR0 bits 1, 2 and 5-7). The f32 kernel needs AVX512-BF16 too: it
 * shares its compiled body (target avx512bf16) with the bf16 one, and the compiler may place a
 * bf16 instruction of the other type's branch ahead of the branch. Asked once; kept. */
int gcg_avx512_attention_available(int bf16) {
    int i = bf16 ? 1 : 0;
    int s = __atomic_load_n(&avx512_state[i], __ATOMIC_ACQUIRE);
    if (s >= 0) return s;
    unsigned a, b, c, d;
    int ok = 0;
    if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 27)) && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
        (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31))) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        ok = (lo & 0xe6) == 0xe6;
        if (ok) {
            unsigned a1, b1, c1, d1;
            ok = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5));
        }
    }
    __atomic_store_n(&avx512_state[i], ok, __ATOMIC_RELEASE);
    return ok;
}

#define AV_ROWS 8 /* query rows per block */
#define AI __attribute__((always_inline))

/* Scores of the block's 8 rows against 16 · nc keys (nc 1 or 2): q words qb [8][qs], k's
 * groups at kg and kg + gs (each [words][16]); scale · q·k written to sc [8][ldsc]. */
TARGET512 static inline AI void scores8(const int bf, const int nc, long words, const uint32_t *qb, long qs,
                                       const uint32_t *kg, long gs, float scale, float *sc, long ldsc) {
    __m512 acc[AV_ROWS][2];
#pragma GCC unroll 8
    for (int r = 0; r < AV_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (long w = 0; w < words; w++) {
        __m512 b0 = _mm512_load_ps((const float *)(kg + 16 * w));
        __m512 b1 = nc > 1 ? _mm512_load_ps((const float *)(kg + gs + 16 * w)) : b0;
#pragma GCC unroll 8
        for (int r = 0; r < AV_ROWS; r++) {
            if (bf) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)qb[r * qs + w]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, (__m512bh)b0);
                if (nc > 1) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, (__m512bh)b1);
            } else {
                __m512 a = _mm512_set1_ps(((const float *)qb)[r * qs + w]);
                acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
                if (nc > 1) acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
            }
        }
    }
    __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 8
    for (int r = 0; r < AV_ROWS; r++) {
        _mm512_store_ps(sc + r * ldsc, _mm512_mul_ps(acc[r][0], vs));
        if (nc > 1) _mm512_store_ps(sc + r * ldsc + 16, _mm512_mul_ps(acc[r][1], vs));
    }
}

/* Output columns [16 · c0, 16 · (c0 + nc)) of 4 rows (r0..r0 + 3 of the block, the first mr
 * of them written): the sum over `steps` of a probability word (pw [4][ps] words) times v's
 * vectors (vp [steps][vs] words); f32 or rounded to bf16, masked to dv columns. */
TARGET512 static inline AI void output4(const int bf, const int nc, long steps, const uint32_t *pw, long ps,
                                       const uint32_t *vp, long vs, long c0, long dv, long mr, void *out, long o_row) {
    __m512 acc[4][6];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 6
        for (int c = 0; c < 6; c++) acc[r][c] = _mm512_setzero_ps();
    for (long j = 0; j < steps; j++) {
        __m512 bv[6];
#pragma GCC unroll 6
        for (int c = 0; c < 6; c++)
            if (c < nc) bv[c] = _mm512_load_ps((const float *)(vp + j * vs + 16 * (c0 + c)));
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            if (bf) {
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)pw[r * ps + j]);
#pragma GCC unroll 6
                for (int c = 0; c < 6; c++)
                    if (c < nc) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, (__m512bh)bv[c]);
            } else {
                __m512 a = _mm512_set1_ps(((const float *)pw)[r * ps + j]);
#pragma GCC unroll 6
                for (int c = 0; c < 6; c++)
                    if (c < nc) acc[r][c] = _mm512_fmadd_ps(a, bv[c], acc[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        if (r >= mr) break;
#pragma GCC unroll 6
        for (int c = 0; c < 6; c++) {
            if (c >= nc) break;
            long col = 16 * (c0 + c), n = dv - col < 16 ? dv - col : 16;
            if (n <= 0) break;
            __mmask16 m = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            if (bf)
                _mm256_mask_storeu_epi16((uint16_t *)out + r * o_row + col, m, (__m256i)_mm512_cvtneps_pbh(acc[r][c]));
            else
                _mm512_mask_storeu_ps((float *)out + r * o_row + col, m, acc[r][c]);
        }
    }
}

/* One (batch, head) pair: out [lq] rows of dv (row stride o_row elements) = softmax(scale · q
 * kᵀ) v, q [lq, d], k [lk, d], v [lk, dv] with row strides q_row, k_row, v_row (elements). */
TARGET512 static void avx512_attention_pair(const int bf, long lq, long lk, long d, long dv, const void *q, long q_row,
                                            const void *k, long k_row, const void *v, long v_row, float scale, void *out,
                                            long o_row, char *mem) {
    const long per = bf ? 32 : 16;                /* elements in 16 words */
    long words = (d + per - 1) / per * 16;        /* q and k words, padded to 16 */
    long lp = (lk + 15) / 16 * 16;                /* keys, padded to 16 */
    long steps = bf ? (lk + 1) / 2 : lk;          /* v's steps */
    long vs = (dv + 15) / 16 * 16;                /* v's words per step */
    long ps = bf ? lp / 2 : lp;                   /* probability words per row */
    uint32_t *kp = (uint32_t *)mem;               /* [lp / 16][words][16] */
    uint32_t *vp = kp + lp * words;               /* [steps][vs] */
    uint32_t *qb = vp + steps * vs;               /* [8][words] */
    float *sc = (float *)(qb + AV_ROWS * words);  /* [8][lp] f32 */
    uint32_t *pw = (uint32_t *)(sc + AV_ROWS * lp); /* [8][ps] (bf16: pairs) */
    uint32_t pad[256] __attribute__((aligned(64)));
    /* One row's 16 words from element `from` on (n elements valid, zeros past them). */
#define ROW_WORDS(src, from, n)                                                                       \
    (bf ? load32((const uint16_t *)(src) + (from), (n))                                               \
        : ((n) <= 0 ? _mm512_setzero_si512()                                                          \
                    : _mm512_maskz_loadu_epi32((n) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n)) - 1), \
                                               (const float *)(src) + (from))))
    const long esz = bf ? 2 : 4;
    for (long g = 0; g < lp / 16; g++)
        for (long s = 0; s < words / 16; s++) {
            for (long r = 0; r < 16; r++) {
                long key = 16 * g + r;
                __m512i x = key < lk ? ROW_WORDS((const char *)k + key * k_row * esz, per * s, d - per * s)
                                     : _mm512_setzero_si512();
                _mm512_store_si512((void *)(pad + 16 * r), x);
            }
            transpose16(pad, 16, kp + (g * words + 16 * s) * 16);
        }
    if (bf) {
        for (long j = 0; j < steps; j++)
            for (long c0 = 0; c0 < vs; c0 += 16) {
                long k0 = 2 * j;
                const uint16_t *v0 = (const uint16_t *)v + k0 * v_row + c0;
                __m512i a = load16_wide(v0, dv - c0);
                __m512i b = k0 + 1 < lk ? load16_wide(v0 + v_row, dv - c0) : _mm512_setzero_si512();
                _mm512_store_si512((void *)(vp + j * vs + c0), _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
            }
    } else {
        for (long j = 0; j < lk; j++)
            for (long c0 = 0; c0 < vs; c0 += 16)
                _mm512_store_si512((void *)(vp + j * vs + c0), ROW_WORDS((const float *)v + j * v_row, c0, dv - c0));
    }
    for (long m0 = 0; m0 < lq; m0 += AV_ROWS) {
        long mr = lq - m0 < AV_ROWS ? lq - m0 : AV_ROWS;
        for (long r = 0; r < AV_ROWS; r++)
            for (long s = 0; s < words / 16; s++) {
                __m512i x = r < mr ? ROW_WORDS((const char *)q + (m0 + r) * q_row * esz, per * s, d - per * s)
                                   : _mm512_setzero_si512();
                _mm512_store_si512((void *)(qb + r * words + 16 * s), x);
            }
        /* The sums run over d's words only (the padding words are zeros). */
        long wd = bf ? (d + 1) / 2 : d;
        for (long g = 0; g < lp / 16; g += 2) {
            const uint32_t *kg = kp + g * words * 16;
            if (bf) {
                if (g + 1 < lp / 16) scores8(1, 2, wd, qb, words, kg, words * 16, scale, sc + 16 * g, lp);
                else scores8(1, 1, wd, qb, words, kg, words * 16, scale, sc + 16 * g, lp);
            } else {
                if (g + 1 < lp / 16) scores8(0, 2, wd, qb, words, kg, words * 16, scale, sc + 16 * g, lp);
                else scores8(0, 1, wd, qb, words, kg, words * 16, scale, sc + 16 * g, lp);
            }
        }
        /* Softmax over the first lk scores of each row, in f32; probabilities as words (0 past lk).
         * Rows past lq: zeros (output4 reads four rows; those it never writes). */
        for (long r = mr; r < AV_ROWS; r++) memset(pw + r * ps, 0, (size_t)ps * 4);
        for (long r = 0; r < mr; r++) {
            float *row = sc + r * lp;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (long c = 0; c < lk; c += 16) {
                __mmask16 m = lk - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (lk - c)) - 1);
                mx = _mm512_mask_max_ps(mx, m, mx, _mm512_load_ps(row + c));
            }
            __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
            for (long c = 0; c < lp; c += 16) {
                __mmask16 m = lk - c >= 16 ? (__mmask16)0xffff : lk - c <= 0 ? 0 : (__mmask16)((1u << (lk - c)) - 1);
                __m512 e = _mm512_maskz_mov_ps(m, _ZGVeN16v_expf(_mm512_sub_ps(_mm512_load_ps(row + c), top)));
                _mm512_store_ps(row + c, e);
                sum = _mm512_add_ps(sum, e);
            }
            __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
            for (long c = 0; c < lp; c += 16) {
                __m512 p = _mm512_mul_ps(_mm512_load_ps(row + c), inv);
                if (bf)
                    _mm256_store_si256((__m256i *)((uint16_t *)(pw + r * ps) + c), (__m256i)_mm512_cvtneps_pbh(p));
                else
                    _mm512_store_ps((float *)(pw + r * ps) + c, p);
            }
        }
        for (long r0 = 0; r0 < mr; r0 += 4) {
            void *o = (char *)out + (m0 + r0) * o_row * esz;
            long rows = mr - r0;
            for (long c0 = 0; c0 < vs / 16; c0 += 6) {
                long nc = vs / 16 - c0;
                const uint32_t *p4 = pw + r0 * ps;
#define OUT_CASE(n)                                                                                \
    case n:                                                                                        \
        if (bf) output4(1, n, steps, p4, ps, vp, vs, c0, dv, rows, o, o_row);                      \
        else output4(0, n, steps, p4, ps, vp, vs, c0, dv, rows, o, o_row);                         \
        break;
                switch (nc > 6 ? 6 : nc) {
                    OUT_CASE(1)
                    OUT_CASE(2)
                    OUT_CASE(3)
                    OUT_CASE(4)
                    OUT_CASE(5)
                    OUT_CASE(6)
                }
#undef OUT_CASE
            }
        }
    }
#undef ROW_WORDS
}

/* The scratch bytes of avx512_attention_pair. */
static size_t avx512_attention_bytes(int bf, long lk, long d, long dv) {
    const long per = bf ? 32 : 16;
    long words = (d + per - 1) / per * 16, lp = (lk + 15) / 16 * 16, steps = bf ? (lk + 1) / 2 : lk;
    long vs = (dv + 15) / 16 * 16, ps = bf ? lp / 2 : lp;
    return ((size_t)lp * words + (size_t)steps * vs + (size_t)AV_ROWS * words + (size_t)AV_ROWS * lp +
            (size_t)AV_ROWS * ps) * 4 + 64;
}

/* A thread's share of the AVX-512 attention (f32 or bf16). */
TARGET512 static void avx512_attention_share(const attention_t *a, int t, int nt, char *mem) {
    const int bf = a->bf16 ? 1 : 0;
    const long esz = bf ? 2 : 4, h = a->h, lq = a->lq, dv = a->dv;
    const long *sq = a->sq, *sk = a->sk, *sv = a->sv;
    for (long p = t; p < a->b * h; p += nt) {
        long bi = p / h, hi = p % h;
        avx512_attention_pair(bf, lq, a->lk, a->d, dv, (const char *)a->q + (bi * sq[0] + hi * sq[1]) * esz, sq[2],
                              (const char *)a->k + (bi * sk[0] + hi * sk[1]) * esz, sk[2],
                              (const char *)a->v + (bi * sv[0] + hi * sv[1]) * esz, sv[2], a->scale,
                              (char *)a->out + (bi * lq * h * dv + hi * dv) * esz, h * dv, mem);
    }
}

/* ---- The attention entry point ------------------------------------------------------------------
 *
 * out [b, lq, h, dv] (contiguous, of q's type) = softmax(scale · q kᵀ) v for q [b, h, lq, d], k
 * [b, h, lk, d], v [b, h, lk, dv], all f32 (bf16 == 0) or all bf16, strides in elements, the
 * last of each operand 1; on the AMX unit (amx != 0: bf16 only) or on AVX-512. Returns 0 when
 * done, -1 when the kernel asked for does not apply (the CPU, the type, a last stride other than
 * 1, d or dv past 256), -2 when memory ran out. */
int gcg_attention(int amx, int bf16, long b, long h, long lq, long lk, long d, long dv, const void *q, const long *sq,
                  const void *k, const long *sk, const void *v, const long *sv, float scale, void *out) {
    if (sq[3] != 1 || sk[3] != 1 || sv[3] != 1 || d <= 0 || dv <= 0 || d > 256 || dv > 256 || lq <= 0 || lk <= 0)
        return -1;
    if (amx ? !(bf16 && gcg_amx_available()) : !gcg_avx512_attention_available(bf16)) return -1;
    const attention_t a = {bf16 ? 1 : 0, b, h, lq, lk, d, dv, q, k, v, sq, sk, sv, scale, out};
    if (amx) return attention_threads(&a, amx_attention_bytes(lk, d, dv), amx_attention_share);
    return attention_threads(&a, avx512_attention_bytes(a.bf16, lk, d, dv), avx512_attention_share);
}
