//! Builds the oneDNN matrix-product shim (csrc/onednn_matmul.c) when Debian's oneDNN is there
//! (`apt install libdnnl-dev`: /usr/include/oneapi/dnnl/dnnl.h and libdnnl.so), and sets
//! `cfg(gcg_onednn)`. Without it gcg builds as before and multiplies with candle.
//! `GCG_NO_ONEDNN=1` turns it off; `DNNL_ROOT=DIR` looks in DIR/include and DIR/lib.
//!
//! Beside it, on x86-64, gcg's own AMX bf16 product (csrc/amx_linear.c, `cfg(gcg_amx)`): it
//! runs on oneDNN's OpenMP runtime (libgomp) and takes erf and tanh from glibc's vector math
//! (libmvec, glibc 2.35 or later), so it is built only when oneDNN is, the C compiler knows the
//! AMX intrinsics and libmvec has them. Whether the CPU has AMX is asked at run time. A second
//! build of the same kernels, with the tile unit computed in software (csrc/amx_soft.c), runs
//! them on CPUs without AMX under `GCG_SOFT_AMX=1`, for tests.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(gcg_onednn)");
    println!("cargo::rustc-check-cfg=cfg(gcg_amx)");
    println!("cargo::rerun-if-changed=csrc/onednn_matmul.c");
    println!("cargo::rerun-if-changed=csrc/amx_linear.c");
    println!("cargo::rerun-if-changed=csrc/amx_soft.c");
    println!("cargo::rerun-if-env-changed=GCG_NO_ONEDNN");
    println!("cargo::rerun-if-env-changed=DNNL_ROOT");
    if std::env::var("GCG_NO_ONEDNN").is_ok_and(|v| !v.is_empty() && v != "0") {
        return;
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let (include, libs): (PathBuf, Vec<PathBuf>) = match std::env::var_os("DNNL_ROOT") {
        Some(root) => {
            let root = PathBuf::from(root);
            (root.join("include"), vec![root.join("lib"), root.join("lib64")])
        }
        None => (
            PathBuf::from("/usr/include"),
            vec![
                PathBuf::from("/usr/lib/x86_64-linux-gnu"),
                PathBuf::from("/usr/lib64"),
                PathBuf::from("/usr/lib"),
            ],
        ),
    };
    let header = include.join("oneapi/dnnl/dnnl.h");
    let Some(lib_dir) = libs.iter().find(|d| d.join("libdnnl.so").exists()) else {
        return;
    };
    if !header.exists() {
        return;
    }
    // The 2.x C API (memory descriptors as structs): the shim is written for it.
    let text = std::fs::read_to_string(&header).unwrap_or_default();
    if !text.contains("dnnl_matmul_desc_init") {
        println!(
            "cargo::warning=oneDNN at {} is not the 2.x C API gcg's shim uses; multiplying with candle",
            header.display()
        );
        return;
    }
    cc::Build::new()
        .file("csrc/onednn_matmul.c")
        .include(&include)
        .opt_level(2)
        .compile("gcg_onednn");
    println!("cargo::rustc-link-search=native={}", lib_dir.display());
    println!("cargo::rustc-link-lib=dylib=dnnl");
    println!("cargo::rustc-cfg=gcg_onednn");
    build_amx(&libs);
}

/// csrc/amx_linear.c when it can be built here (see the top of this file); a warning says why
/// not otherwise, and the bf16 products stay with oneDNN.
fn build_amx(libs: &[PathBuf]) {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        return;
    }
    let mut dirs = libs.to_vec();
    dirs.extend(["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64"].map(PathBuf::from));
    let has = |name: &str, symbol: &[u8]| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| std::fs::read(p).is_ok_and(|bytes| bytes.windows(symbol.len()).any(|w| w == symbol)))
    };
    let (Some(mvec), Some(gomp)) = (has("libmvec.so.1", b"_ZGVeN16v_erff"), has("libgomp.so.1", b"GOMP_parallel")) else {
        println!("cargo::warning=no libmvec with erf (glibc >= 2.35) or no libgomp: gcg's AMX product is not built");
        return;
    };
    // The same kernels with the tile unit in software (csrc/amx_soft.c, `GCG_SOFT_AMX=1`), so
    // that they can be tested on CPUs without AMX.
    let built = ["csrc/amx_linear.c", "csrc/amx_soft.c"]
        .into_iter()
        .zip(["gcg_amx", "gcg_amx_soft"])
        .try_for_each(|(file, lib)| cc::Build::new().file(file).flag("-fopenmp").opt_level(2).try_compile(lib));
    if let Err(e) = built {
        println!("cargo::warning=the C compiler cannot build gcg's AMX product ({e}); bf16 products stay with oneDNN");
        return;
    }
    for lib in [&mvec, &gomp] {
        if let Some(dir) = lib.parent() {
            println!("cargo::rustc-link-search=native={}", dir.display());
        }
    }
    // The run-time libraries by their exact names (no development symlink is needed).
    println!("cargo::rustc-link-lib=dylib:+verbatim=libmvec.so.1");
    println!("cargo::rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    println!("cargo::rustc-cfg=gcg_amx");
}
