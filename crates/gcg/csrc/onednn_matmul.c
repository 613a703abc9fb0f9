/* gcg's one call into oneDNN (Debian's libdnnl, 2.x C API): a fully connected layer with its
 * epilogue fused into the product,
 *
 *     y [m, n] = residual + gate ⊙ act(x [m, k] · w [n, k]ᵀ + bias [n])
 *
 * for row-major x and w of one type (f32 or bf16), y in f32 or bf16 (accumulation in f32
 * either way), an optional f32 bias, an optional activation, an optional element-wise gate
 * [m, n] and an optional residual (y holds it on entry: oneDNN's "sum" post-op). Built by
 * build.rs only when oneDNN is found; the Rust side (nn/linear.rs) falls back to candle's plain
 * ops otherwise. oneDNN's own primitive cache makes re-creating the primitive for a seen shape
 * cheap. A frozen weight read as it is (row-major) is repacked by the kernel on every call; a
 * layer whose products recur keeps a copy in the kernel's own blocked layout instead
 * (gcg_onednn_pack, gcg_onednn_linear_packed). Beside it: the batched products and softmax of
 * attention. */
#define _GNU_SOURCE
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <dlfcn.h>
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The threads oneDNN's OpenMP runtime uses from now on (Debian's libdnnl runs on libgomp, which
 * reads OMP_NUM_THREADS before main; looked up at run time so that no OpenMP library is linked
 * by name). Returns 0 when set, -1 when the process has no OpenMP runtime. */
int gcg_onednn_set_threads(int n) {
    void (*set)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "omp_set_num_threads");
    if (!set) return -1;
    set(n);
    return 0;
}

/* Caps the instruction sets oneDNN's kernels use at gcg's GCG_MAX_CPU_ISA (src/nn/isa.rs):
 * level 0 plain x86-64 (oneDNN's SSE4.1 floor), 1 AVX2, 2 AVX-512 (avx512_core), 3 AVX512-BF16.
 * Takes effect only before oneDNN's first kernel. Returns oneDNN's status. */
int gcg_onednn_cap_isa(int level) {
    static const dnnl_cpu_isa_t isa[] = {dnnl_cpu_isa_sse41, dnnl_cpu_isa_avx2, dnnl_cpu_isa_avx512_core,
                                         dnnl_cpu_isa_avx512_core_bf16};
    if (level < 0 || level > 3) return dnnl_invalid_arguments;
    return dnnl_set_max_cpu_isa(isa[level]);
}

/* 1 when oneDNN's instruction set (the CPU's under its cap) has its bf16 matmul kernels, AVX-512
 * (avx512_core) or more; else 0. Fixes oneDNN's cap: ask after gcg_onednn_cap_isa. */
int gcg_onednn_bf16(void) {
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    return (isa & dnnl_cpu_isa_avx512_core) == dnnl_cpu_isa_avx512_core;
}

static dnnl_engine_t engine;
static dnnl_status_t engine_status = dnnl_runtime_error;
static pthread_once_t engine_once = PTHREAD_ONCE_INIT;

static void make_engine(void) { engine_status = dnnl_engine_create(&engine, dnnl_cpu, 0); }

#define TRY(x) do { st = (x); if (st != dnnl_success) goto done; } while (0)

/* Returned instead of a dnnl_status_t when oneDNN has only its reference implementation for a
 * problem: plain loops, ~100x slower than gcg's fallback (the product without the epilogue, then
 * the element-wise ops). Below AVX-512, Debian's oneDNN 2.6 has no optimised matmul for an
 * activation or a gate followed by the residual's sum (0.2 GFLOP/s measured on such a product). */
#define GCG_REFERENCE_ONLY 100

/* The status for a created pd: GCG_REFERENCE_ONLY when oneDNN picked a reference kernel. */
static int refuse_reference(const_dnnl_primitive_desc_t pd) {
    const char *impl = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success || !impl) return 0;
    return strncmp(impl, "ref", 3) == 0 ? GCG_REFERENCE_ONLY : 0;
}

/* Which of oneDNN's kernels runs the f32 products of many rows. Debian's oneDNN 2.6 has two for
 * f32 on an AVX-512 CPU, and picks its brgemm one ("brg:avx512_core") before its gemm one
 * ("gemm:jit", its sgemm with the epilogue applied by the primitive). On an Intel Xeon with AMX
 * (CPU family 6 model 207, 2 cores, 2026-12-05) the gemm kernel ran the ViT-g's four product
 * shapes at 1028 rows, epilogues included, 10-35% faster (248-311 against 205-276 GFLOP/s, the
 * same process and buffers, 16 distinct weights), at 8224 rows in one call 20-60% faster; at 512
 * rows the two were equal, at 224 (T5's prompt) and 32 brgemm was faster (by 10-20% and 1.8x).
 * Alternated call by call with distinct weights from memory (as a ViT pass reads them), the
 * four shapes at 1028 rows: 4-13% faster than brgemm on the weights as given and 2-7% faster than
 * brgemm on its packed copies, in every round; at 928 rows (a 32-frame pass's row blocks) 0-5%
 * and within ±3%; the Q-Former's 768-wide products at 928 rows 3-5% slower. On the AMD machines
 * this project ran on (family 25, AVX-512) brgemm already reached 85-93% of the FMA units' peak
 * on the ViT's shapes, so it stays there: the gemm kernel is chosen on Intel CPUs for f32
 * products of at least GEMM_MIN_ROWS rows a call and GEMM_MIN_COLS outputs. GCG_ONEDNN_F32=
 * gemm|brgemm sets the choice for every CPU (auto: the rule above); gcg_onednn_f32_gemm_here
 * overrides it on one thread (tests). Where the chosen kind has no kernel for a problem (an
 * activation or a gate before the residual's sum), oneDNN's first choice runs. */
#define GEMM_MIN_ROWS 768
#define GEMM_MIN_COLS 1024

static int intel_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    return b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu; /* "Genu" "ineI" "ntel" */
#else
    return 0;
#endif
}

/* 1 gemm, 0 brgemm, for f32 products of many rows (the process-wide choice, made once). */
static int f32_gemm_choice(void) {
    static int choice = -1;
    int c = __atomic_load_n(&choice, __ATOMIC_RELAXED);
    if (c < 0) {
        const char *e = getenv("GCG_ONEDNN_F32");
        if (e && strcmp(e, "gemm") == 0)
            c = 1;
        else if (e && strcmp(e, "brgemm") == 0)
            c = 0;
        else
            c = intel_cpu();
        __atomic_store_n(&choice, c, __ATOMIC_RELAXED);
    }
    return c;
}

static __thread int f32_gemm_here = -1; /* -1: the process-wide choice */

/* On this thread: 1 the gemm kernel for f32 products of any rows, 0 brgemm (oneDNN's first
 * choice), -1 back to the process-wide rule. For tests. */
void gcg_onednn_f32_gemm_here(int on) { f32_gemm_here = on < 0 ? -1 : on != 0; }

/* 1 when an f32 product of m rows a call and n outputs runs on the gemm kernel where it has one. */
static int f32_gemm(long m, long n) {
    if (f32_gemm_here >= 0) return f32_gemm_here;
    return m >= GEMM_MIN_ROWS && n >= GEMM_MIN_COLS && f32_gemm_choice();
}

/* The process-wide choice, for gcg's bench report: 1 gemm for f32 products of at least
 * `*min_rows` rows a call and `*min_cols` outputs, 0 brgemm. */
int gcg_onednn_f32_gemm(long *min_rows, long *min_cols) {
    if (min_rows) *min_rows = GEMM_MIN_ROWS;
    if (min_cols) *min_cols = GEMM_MIN_COLS;
    return f32_gemm_choice();
}

/* The kernel of this thread's last fully connected product ("" before the first), for tests. */
static __thread char last_impl[64];
const char *gcg_onednn_last_impl(void) { return last_impl; }

/* Creates the primitive descriptor of `op` with `attr`: oneDNN's first choice, or with `gemm` set
 * its first "gemm:" kernel where it has one for the problem. */
static dnnl_status_t create_pd(dnnl_primitive_desc_t *pd, const void *op, const_dnnl_primitive_attr_t attr, int gemm) {
    *pd = NULL;
    if (gemm) {
        dnnl_primitive_desc_iterator_t it = NULL;
        if (dnnl_primitive_desc_iterator_create(&it, op, attr, engine, NULL) == dnnl_success) {
            do {
                dnnl_primitive_desc_t cand = dnnl_primitive_desc_iterator_fetch(it);
                const char *impl = NULL;
                if (!cand) break;
                if (dnnl_primitive_desc_query(cand, dnnl_query_impl_info_str, 0, &impl) == dnnl_success && impl &&
                    strncmp(impl, "gemm:", 5) == 0) {
                    *pd = cand;
                    break;
                }
                dnnl_primitive_desc_destroy(cand);
            } while (dnnl_primitive_desc_iterator_next(it) == dnnl_success);
            dnnl_primitive_desc_iterator_destroy(it);
        }
        if (*pd) return dnnl_success;
    }
    return dnnl_primitive_desc_create(pd, op, attr, engine, NULL);
}

/* Notes the kernel of pd as this thread's last (gcg_onednn_last_impl). */
static void note_impl(const_dnnl_primitive_desc_t pd) {
    const char *impl = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl) != dnnl_success || !impl) impl = "?";
    strncpy(last_impl, impl, sizeof last_impl - 1);
    last_impl[sizeof last_impl - 1] = 0;
}

/* One argument of a primitive: its kind (DNNL_ARG_…), memory descriptor and buffer. */
typedef struct {
    int kind;
    const dnnl_memory_desc_t *md;
    const void *ptr;
} arg_t;

/* Runs the primitive of `pd`, its n arguments bound to their buffers, on a fresh stream and
 * waits. Returns its status. */
static dnnl_status_t exec(const_dnnl_primitive_desc_t pd, int n, const arg_t *args) {
    dnnl_status_t st = dnnl_success;
    dnnl_primitive_t prim = NULL;
    dnnl_stream_t stream = NULL;
    dnnl_memory_t mem[5] = {NULL};
    dnnl_exec_arg_t exec[5];
    if (n > 5) return dnnl_invalid_arguments;
    TRY(dnnl_primitive_create(&prim, pd));
    for (int i = 0; i < n; i++) {
        TRY(dnnl_memory_create(&mem[i], args[i].md, engine, (void *)args[i].ptr));
        exec[i] = (dnnl_exec_arg_t){args[i].kind, mem[i]};
    }
    TRY(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags));
    TRY(dnnl_primitive_execute(prim, stream, n, exec));
    TRY(dnnl_stream_wait(stream));
done:
    if (stream) dnnl_stream_destroy(stream);
    for (int i = 0; i < n; i++)
        if (mem[i]) dnnl_memory_destroy(mem[i]);
    if (prim) dnnl_primitive_destroy(prim);
    return st;
}

/* Creates the primitive of `op` (a matmul or softmax descriptor) with `attr` and runs it on the n
 * arguments (see exec). Returns its status, or GCG_REFERENCE_ONLY (nothing run). */
static int run(const void *op, const_dnnl_primitive_attr_t attr, int n, const arg_t *args) {
    pthread_once(&engine_once, make_engine);
    if (engine_status != dnnl_success) return engine_status;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_status_t st = dnnl_primitive_desc_create(&pd, op, attr, engine, NULL);
    int refused = st == dnnl_success ? refuse_reference(pd) : 0;
    if (st == dnnl_success && !refused) st = exec(pd, n, args);
    if (pd) dnnl_primitive_desc_destroy(pd);
    return refused ? refused : (int)st;
}

/* A weight in the layout a matmul kernel reads it in (oneDNN's blocked "any" format for one
 * problem), made once by reordering the row-major weight so that products need not repack it
 * on every call. Read-only once made. */
typedef struct {
    dnnl_memory_desc_t md;
    void *buf;
    size_t bytes;
} packed_t;

void gcg_onednn_packed_free(void *p) {
    if (!p) return;
    free(((packed_t *)p)->buf);
    free(p);
}

size_t gcg_onednn_packed_bytes(const void *p) { return p ? ((const packed_t *)p)->bytes : 0; }

/* Reorders the weights of layout `from` at w into a new packed_t of layout `to`; NULL when out of
 * memory or the reorder fails (*st says which oneDNN status, dnnl_out_of_memory for memory). */
static packed_t *pack(const dnnl_memory_desc_t *from, const void *w, const dnnl_memory_desc_t *to, dnnl_status_t *st) {
    dnnl_primitive_desc_t rpd = NULL;
    packed_t *p = calloc(1, sizeof *p);
    size_t bytes = dnnl_memory_desc_get_size(to);
    *st = dnnl_out_of_memory;
    if (!p) return NULL;
    p->md = *to;
    p->bytes = bytes;
    p->buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p->buf) goto fail;
    *st = dnnl_reorder_primitive_desc_create(&rpd, from, engine, to, engine, NULL);
    if (*st != dnnl_success) goto fail;
    {
        arg_t args[2] = {{DNNL_ARG_FROM, from, w}, {DNNL_ARG_TO, to, p->buf}};
        *st = exec(rpd, 2, args);
    }
    dnnl_primitive_desc_destroy(rpd);
    if (*st != dnnl_success) goto fail;
    return p;
fail:
    if (p) free(p->buf);
    free(p);
    return NULL;
}

/* The fully connected layer (see the top of this file) with its weights either as given (row-major
 * w) or, when `use` is set and its layout is the one this problem's kernel reads, from `use`'s
 * packed copy. With `make` set it computes nothing: it stores in *make a packed copy of w in the
 * layout this problem's kernel reads, or NULL when that layout is w's own. act: 0 none, 1 exact
 * (erf) GELU, 2 tanh GELU, 3 ReLU. Returns 0 on success, else the dnnl_status_t (or
 * GCG_REFERENCE_ONLY: nothing computed). */
static int linear(int in_bf16, int out_bf16, long m, long n, long k, const void *x, const void *w, const float *bias,
                  int act, const void *gate, int gate_bf16, int residual, void *y, const packed_t *use, packed_t **make,
                  size_t max_bytes) {
    dnnl_status_t st = dnnl_success;
    dnnl_data_type_t it = in_bf16 ? dnnl_bf16 : dnnl_f32, ot = out_bf16 ? dnnl_bf16 : dnnl_f32;
    dnnl_memory_desc_t xd, wd, yd, bd, gd, anyd;
    dnnl_matmul_desc_t md;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_dims_t xdims = {m, k}, xstr = {k, 1};
    dnnl_dims_t wdims = {k, n}, wstr = {1, k}; /* w [n, k] row-major read as wᵀ [k, n] */
    dnnl_dims_t ydims = {m, n}, ystr = {n, 1};
    dnnl_dims_t bdims = {1, n}, bstr = {n, 1};
    const dnnl_memory_desc_t *wmd = &wd;
    const void *wptr = w;
    int gemm = !in_bf16 && f32_gemm(m, n);
    if (make && gemm) {
        /* The gemm kernel packs its operands itself on every call; a copy in the layout it
         * asks for (wᵀ row-major) made it slower (the ViT-g at 4 frames a pass: 40 s against
         * 35 s with none), so none is made, and none is read below. */
        *make = NULL;
        return 0;
    }
    pthread_once(&engine_once, make_engine);
    if (engine_status != dnnl_success) return (int)engine_status;
    TRY(dnnl_memory_desc_init_by_strides(&xd, 2, xdims, it, xstr));
    TRY(dnnl_memory_desc_init_by_strides(&wd, 2, wdims, it, wstr));
    TRY(dnnl_memory_desc_init_by_strides(&yd, 2, ydims, ot, ystr));
    TRY(dnnl_memory_desc_init_by_strides(&bd, 2, bdims, dnnl_f32, bstr));
    TRY(dnnl_memory_desc_init_by_strides(&gd, 2, ydims, gate_bf16 ? dnnl_bf16 : dnnl_f32, ystr));
    TRY(dnnl_primitive_attr_create(&attr));
    TRY(dnnl_post_ops_create(&po));
    if (act) {
        dnnl_alg_kind_t alg = act == 1 ? dnnl_eltwise_gelu_erf : act == 2 ? dnnl_eltwise_gelu_tanh : dnnl_eltwise_relu;
        TRY(dnnl_post_ops_append_eltwise(po, 1.0f, alg, 0.0f, 0.0f));
    }
    if (gate) TRY(dnnl_post_ops_append_binary(po, dnnl_binary_mul, &gd));
    if (residual) TRY(dnnl_post_ops_append_sum(po, 1.0f));
    TRY(dnnl_primitive_attr_set_post_ops(attr, po));
    if ((use || make) && !gemm) {
        /* The layout this problem's kernel would pick for the weights. */
        TRY(dnnl_memory_desc_init_by_tag(&anyd, 2, wdims, it, dnnl_format_tag_any));
        TRY(dnnl_matmul_desc_init(&md, &xd, &anyd, bias ? &bd : NULL, &yd));
        TRY(dnnl_primitive_desc_create(&pd, &md, attr, engine, NULL));
        if ((st = (dnnl_status_t)refuse_reference(pd))) goto done;
        const dnnl_memory_desc_t *want = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
        if (!want) {
            st = dnnl_runtime_error;
            goto done;
        }
        if (make) {
            size_t bytes = dnnl_memory_desc_get_size(want);
            *make = dnnl_memory_desc_equal(want, &wd) || bytes > max_bytes ? NULL : pack(&wd, w, want, &st);
            goto done;
        }
        if (dnnl_memory_desc_equal(want, &use->md)) {
            wmd = &use->md;
            wptr = use->buf;
        } else {
            /* Another layout for this problem than the one packed: the weights as given. */
            dnnl_primitive_desc_destroy(pd);
            pd = NULL;
        }
    }
    if (!pd) {
        TRY(dnnl_matmul_desc_init(&md, &xd, &wd, bias ? &bd : NULL, &yd));
        TRY(create_pd(&pd, &md, attr, gemm));
        if ((st = (dnnl_status_t)refuse_reference(pd))) goto done;
    }
    note_impl(pd);
    {
        arg_t args[5] = {{DNNL_ARG_SRC, &xd, x}, {DNNL_ARG_WEIGHTS, wmd, wptr}, {DNNL_ARG_DST, &yd, y}};
        int nargs = 3;
        if (bias) args[nargs++] = (arg_t){DNNL_ARG_BIAS, &bd, bias};
        /* The gate is the binary post-op, the first post-op after the activation (if any). */
        if (gate) args[nargs++] = (arg_t){DNNL_ARG_ATTR_MULTIPLE_POST_OP(act ? 1 : 0) | DNNL_ARG_SRC_1, &gd, gate};
        st = exec(pd, nargs, args);
    }
done:
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return (int)st;
}

/* Rows per oneDNN call for a product of m rows. Debian's oneDNN 2.6 runs products of many rows
 * well below its speed on fewer: on the ViT-g's shapes at 8224 rows (32 frames a pass) 56-62% of
 * the vector units' peak, against 85-93% for the same product in calls of ~1000 rows (AVX-512
 * and AVX512-BF16, 2 cores; measured with csrc's products alone, packed and as given). So past
 * 2048 rows a product is split into calls of nearly equal row blocks of at most 1024 (a multiple
 * of 16). GCG_ONEDNN_ROWS=N sets the block instead (0: never split), for comparisons. */
static long rows_per_call(long m) {
    static long block = -1;
    long b = __atomic_load_n(&block, __ATOMIC_RELAXED);
    if (b < 0) {
        const char *e = getenv("GCG_ONEDNN_ROWS");
        b = e && *e ? atol(e) : 1024;
        if (b < 0) b = 0;
        if (b > (1L << 40)) b = 1L << 40;
        __atomic_store_n(&block, b, __ATOMIC_RELAXED);
    }
    if (b == 0 || m <= 2 * b) return m;
    long calls = (m + b - 1) / b, rows = (m + calls - 1) / calls;
    rows = (rows + 15) / 16 * 16;
    return rows < b ? rows : b;
}

/* rows_per_call, for tests. */
long gcg_onednn_rows_per_call(long m) { return rows_per_call(m); }

/* y[i] += t[i] over count values, y f32 or bf16 (the f32 sum rounded to nearest even, a NaN kept
 * a quiet NaN: what oneDNN's sum post-op writes). */
static void add_into(void *y, int y_bf16, const float *t, size_t count) {
    if (!y_bf16) {
        float *yf = y;
        for (size_t i = 0; i < count; i++) yf[i] += t[i];
        return;
    }
    uint16_t *yb = y;
    for (size_t i = 0; i < count; i++) {
        union { float f; uint32_t u; } v;
        v.u = (uint32_t)yb[i] << 16;
        v.f += t[i];
        uint32_t u = v.u;
        yb[i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

/* Products whose residual was added by add_into (see linear_rows), for tests. */
static long split_residuals;
long gcg_onednn_split_residuals(void) { return __atomic_load_n(&split_residuals, __ATOMIC_RELAXED); }

/* linear() over blocks of rows_per_call(m) rows: x, the gate and y advanced by whole rows (each
 * row of the result depends only on the same row of x, the gate and the residual in y). Where
 * oneDNN has only its reference kernel for the epilogue with the residual's sum (an activation or
 * a gate followed by the sum, below AVX-512), the product and the rest of the epilogue go to an
 * f32 scratch and the residual is added here, as the sum post-op would add it. */
static int linear_rows(int in_bf16, int out_bf16, long m, long n, long k, const void *x, const void *w,
                       const float *bias, int act, const void *gate, int gate_bf16, int residual, void *y,
                       const packed_t *use) {
    long rows = rows_per_call(m);
    size_t xs = in_bf16 ? 2 : 4, ys = out_bf16 ? 2 : 4, gs = gate_bf16 ? 2 : 4;
    int split = 0; /* the sum was refused for an earlier block: go straight to the scratch */
    for (long r0 = 0; r0 < m; r0 += rows) {
        long mr = m - r0 < rows ? m - r0 : rows;
        const void *xr = (const char *)x + r0 * k * xs, *gr = gate ? (const char *)gate + r0 * n * gs : NULL;
        void *yr = (char *)y + r0 * n * ys;
        int st = split ? GCG_REFERENCE_ONLY
                       : linear(in_bf16, out_bf16, mr, n, k, xr, w, bias, act, gr, gate_bf16, residual, yr, use, NULL, 0);
        if (st == GCG_REFERENCE_ONLY && residual) {
            split = 1;
            float *t = malloc((size_t)mr * n * sizeof(float));
            if (!t) return dnnl_out_of_memory;
            st = linear(in_bf16, 0, mr, n, k, xr, w, bias, act, gr, gate_bf16, 0, t, use, NULL, 0);
            if (!st) {
                add_into(yr, out_bf16, t, (size_t)mr * n);
                __atomic_add_fetch(&split_residuals, 1, __ATOMIC_RELAXED);
            }
            free(t);
        }
        if (st) return st;
    }
    return 0;
}

int gcg_onednn_linear(int in_bf16, int out_bf16, long m, long n, long k, const void *x, const void *w,
                      const float *bias, int act, const void *gate, int gate_bf16, int residual, void *y) {
    return linear_rows(in_bf16, out_bf16, m, n, k, x, w, bias, act, gate, gate_bf16, residual, y, NULL);
}

/* gcg_onednn_linear reading the weights from `packed` (made by gcg_onednn_pack for this problem)
 * when its layout is the one this problem's kernel reads, else from w. */
int gcg_onednn_linear_packed(int in_bf16, int out_bf16, long m, long n, long k, const void *x, const void *w,
                             const float *bias, int act, const void *gate, int gate_bf16, int residual, void *y,
                             const void *packed) {
    return linear_rows(in_bf16, out_bf16, m, n, k, x, w, bias, act, gate, gate_bf16, residual, y, packed);
}

/* A packed copy of w for the product gcg_onednn_linear would run with these arguments (x, y and
 * the gate are not read), stored in *out; NULL there when the kernel reads w as it is or the copy
 * would take more than max_bytes. Free it with gcg_onednn_packed_free. Returns 0 on success, else
 * the dnnl_status_t (dnnl_out_of_memory when the copy could not be allocated). */
int gcg_onednn_pack(int in_bf16, int out_bf16, long m, long n, long k, const void *w, const float *bias, int act,
                    int gate, int gate_bf16, int residual, size_t max_bytes, void **out) {
    packed_t *p = NULL;
    /* x, y and the gate: non-null placeholders, never read (no product runs). */
    /* For the row blocks the product is computed in (their kernel's layout). */
    int st = linear(in_bf16, out_bf16, rows_per_call(m), n, k, w, w, bias, act, gate ? w : NULL, gate_bf16, residual,
                    (void *)w, NULL, &p, max_bytes);
    *out = p;
    return st;
}

/* Batched product with strided operands, for attention:
 *
 *     c [b0, b1, m, n] = alpha · a [b0, b1, m, k] · b [b0, b1, k, n]
 *
 * each operand given by its four strides (in elements), so q, kᵀ, v and the merged-head output
 * are read and written in place. a and b are both f32 or both bf16 (ab_bf16); c is f32 or bf16
 * (c_bf16); the accumulation is f32. Returns 0 on success, else the dnnl_status_t (or
 * GCG_REFERENCE_ONLY). */
int gcg_onednn_bmm(int ab_bf16, int c_bf16, long b0, long b1, long m, long n, long k, const void *a, const long *sa,
                   const void *b, const long *sb, float alpha, void *c, const long *sc) {
    dnnl_status_t st = dnnl_success;
    dnnl_data_type_t it = ab_bf16 ? dnnl_bf16 : dnnl_f32, ot = c_bf16 ? dnnl_bf16 : dnnl_f32;
    dnnl_memory_desc_t ad, bd, cd;
    dnnl_matmul_desc_t md;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t po = NULL;
    dnnl_dims_t adims = {b0, b1, m, k}, bdims = {b0, b1, k, n}, cdims = {b0, b1, m, n};
    dnnl_dims_t as = {sa[0], sa[1], sa[2], sa[3]}, bs = {sb[0], sb[1], sb[2], sb[3]}, cs = {sc[0], sc[1], sc[2], sc[3]};
    TRY(dnnl_memory_desc_init_by_strides(&ad, 4, adims, it, as));
    TRY(dnnl_memory_desc_init_by_strides(&bd, 4, bdims, it, bs));
    TRY(dnnl_memory_desc_init_by_strides(&cd, 4, cdims, ot, cs));
    TRY(dnnl_matmul_desc_init(&md, &ad, &bd, NULL, &cd));
    TRY(dnnl_primitive_attr_create(&attr));
    if (alpha != 1.0f) {
        TRY(dnnl_post_ops_create(&po));
        TRY(dnnl_post_ops_append_eltwise(po, 1.0f, dnnl_eltwise_linear, alpha, 0.0f));
        TRY(dnnl_primitive_attr_set_post_ops(attr, po));
    }
    {
        arg_t args[3] = {{DNNL_ARG_SRC, &ad, a}, {DNNL_ARG_WEIGHTS, &bd, b}, {DNNL_ARG_DST, &cd, c}};
        st = (dnnl_status_t)run(&md, attr, 3, args);
    }
done:
    if (po) dnnl_post_ops_destroy(po);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return (int)st;
}

/* y [rows, n] = softmax over each row of x [rows, n] (f32), y in f32 or bf16 (y_bf16); both
 * row-major and contiguous. Returns 0 on success, else the dnnl_status_t (or GCG_REFERENCE_ONLY). */
int gcg_onednn_softmax(long rows, long n, const float *x, void *y, int y_bf16) {
    dnnl_status_t st = dnnl_success;
    dnnl_memory_desc_t xd, yd;
    dnnl_softmax_v2_desc_t sd;
    dnnl_dims_t dims = {rows, n}, str = {n, 1};
    TRY(dnnl_memory_desc_init_by_strides(&xd, 2, dims, dnnl_f32, str));
    TRY(dnnl_memory_desc_init_by_strides(&yd, 2, dims, y_bf16 ? dnnl_bf16 : dnnl_f32, str));
    TRY(dnnl_softmax_v2_forward_desc_init(&sd, dnnl_forward_inference, dnnl_softmax_accurate, &xd, &yd, 1));
    {
        arg_t args[2] = {{DNNL_ARG_SRC, &xd, x}, {DNNL_ARG_DST, &yd, y}};
        st = (dnnl_status_t)run(&sd, NULL, 2, args);
    }
done:
    return (int)st;
}
