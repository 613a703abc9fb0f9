/* gcg's one call into oneDNN (Debian's libdnnl, 2.x C API): y = x · wᵀ for row-major
 * x [m, k] and w [n, k], in f32 or bf16 (the output in the inputs' type). Built by build.rs
 * only when oneDNN is found; the Rust side (nn/linear.rs) falls back to candle otherwise.
 * oneDNN's own primitive cache makes re-creating the primitive for a seen shape cheap. */
#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>

static dnnl_engine_t engine;
static dnnl_status_t engine_status = dnnl_runtime_error;
static pthread_once_t engine_once = PTHREAD_ONCE_INIT;

static void make_engine(void) { engine_status = dnnl_engine_create(&engine, dnnl_cpu, 0); }

#define TRY(x) do { st = (x); if (st != dnnl_success) goto done; } while (0)

/* Returns 0 on success, else the dnnl_status_t. */
int gcg_onednn_matmul_wt(int bf16, long m, long n, long k, const void *x, const void *w, void *y) {
    pthread_once(&engine_once, make_engine);
    if (engine_status != dnnl_success) return (int)engine_status;
    dnnl_status_t st = dnnl_success;
    dnnl_data_type_t dt = bf16 ? dnnl_bf16 : dnnl_f32;
    dnnl_memory_desc_t xd, wd, yd;
    dnnl_matmul_desc_t md;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    dnnl_memory_t xm = NULL, wm = NULL, ym = NULL;
    dnnl_stream_t stream = NULL;
    dnnl_dims_t xdims = {m, k}, xstr = {k, 1};
    dnnl_dims_t wdims = {k, n}, wstr = {1, k}; /* w [n, k] row-major read as wᵀ [k, n] */
    dnnl_dims_t ydims = {m, n}, ystr = {n, 1};
    TRY(dnnl_memory_desc_init_by_strides(&xd, 2, xdims, dt, xstr));
    TRY(dnnl_memory_desc_init_by_strides(&wd, 2, wdims, dt, wstr));
    TRY(dnnl_memory_desc_init_by_strides(&yd, 2, ydims, dt, ystr));
    TRY(dnnl_matmul_desc_init(&md, &xd, &wd, NULL, &yd));
    TRY(dnnl_primitive_desc_create(&pd, &md, NULL, engine, NULL));
    TRY(dnnl_primitive_create(&prim, pd));
    TRY(dnnl_memory_create(&xm, &xd, engine, (void *)x));
    TRY(dnnl_memory_create(&wm, &wd, engine, (void *)w));
    TRY(dnnl_memory_create(&ym, &yd, engine, y));
    TRY(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags));
    {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}};
        TRY(dnnl_primitive_execute(prim, stream, 3, args));
        TRY(dnnl_stream_wait(stream));
    }
done:
    if (stream) dnnl_stream_destroy(stream);
    if (ym) dnnl_memory_destroy(ym);
    if (wm) dnnl_memory_destroy(wm);
    if (xm) dnnl_memory_destroy(xm);
    if (prim) dnnl_primitive_destroy(prim);
    if (pd) dnnl_primitive_desc_destroy(pd);
    return (int)st;
}
