//! Builds the oneDNN matrix-product shim (csrc/onednn_matmul.c) when Debian's oneDNN is there
//! (`apt install libdnnl-dev`: /usr/include/oneapi/dnnl/dnnl.h and libdnnl.so), and sets
//! `cfg(gcg_onednn)`. Without it gcg builds as before and multiplies with candle.
//! `GCG_NO_ONEDNN=1` turns it off; `DNNL_ROOT=DIR` looks in DIR/include and DIR/lib.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(gcg_onednn)");
    println!("cargo::rerun-if-changed=csrc/onednn_matmul.c");
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
}
