//! `--threads N` reaches candle's thread count (the bench JSON reports it), and the default
//! without it is the machine's, fixed once (RAYON_NUM_THREADS unset in the child); `--matmul-precision`
//! reaches the setting of the f32 products; `gcg bench peak` and the ViT's GFLOP/s in `gcg bench forward`.

use std::process::Command;

/// `gcg bench train-step` on the tiny preset with `extra` arguments and environment changes
/// (`None` removes the variable): its JSON's `kernels` and its stderr.
fn bench_kernels(extra: &[&str], env: &[(&str, Option<&str>)]) -> (serde_json::Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gcg"));
    cmd.args([
        "bench",
        "train-step",
        "--preset",
        "tiny",
        "--batch",
        "1",
        "--iters",
        "1",
        "--frames",
        "8",
    ])
    .args(extra);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().expect("running gcg");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "gcg failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    (v["kernels"].clone(), stderr)
}

fn bench_threads(extra: &[&str]) -> (serde_json::Value, String) {
    bench_kernels(extra, &[("RAYON_NUM_THREADS", None)])
}

#[test]
fn threads_flag_sets_the_tensor_thread_count() {
    let (k, err) = bench_threads(&["--threads", "1"]);
    assert_eq!(k["threads"], 1, "{k} {err}");
    assert!(k["matmul"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    assert!(k["attention"].as_str().is_some_and(|s| !s.is_empty()), "{k}");
    let (k, err) = bench_threads(&["--threads", "3"]);
    assert_eq!(k["threads"], 3, "{k} {err}");
    let (k, err) = bench_threads(&[]);
    let n = k["threads"].as_u64().unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    assert!(n >= 1 && n <= cores, "default {n} threads on {cores} cores: {err}");
    let out = Command::new(env!("CARGO_BIN_EXE_gcg"))
        .args(["bench", "train-step", "--threads", "0"])
        .output()
        .expect("running gcg");
    assert!(!out.status.success(), "--threads 0 is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"));
}

/// Training does not keep packed copies of frozen weights (their memory goes to activations)
/// unless `GCG_PACK_WEIGHTS=1` says so; inference does unless `GCG_PACK_WEIGHTS=0` says not
/// (`bench forward` on the tiny preset: its products are too narrow for oneDNN, so no bytes).
#[test]
fn frozen_weights_are_packed_outside_training_unless_told_otherwise() {
    let onednn = gcg::nn::linear::ONEDNN;
    let (k, err) = bench_kernels(&[], &[("GCG_PACK_WEIGHTS", None)]);
    assert_eq!(k["packed_weights"]["enabled"], false, "{k} {err}");
    assert_eq!(k["packed_weights"]["bytes"], 0, "{k} {err}");
    let (k, err) = bench_kernels(&[], &[("GCG_PACK_WEIGHTS", Some("1"))]);
    assert_eq!(k["packed_weights"]["enabled"], onednn, "{k} {err}");
    let forward = |env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gcg"));
        cmd.args(["bench", "forward", "--preset", "tiny", "--iters", "1", "--new-tokens", "1"]);
        match env {
            Some(v) => cmd.env("GCG_PACK_WEIGHTS", v),
            None => cmd.env_remove("GCG_PACK_WEIGHTS"),
        };
        let out = cmd.output().expect("running gcg");
        assert!(out.status.success(), "gcg failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
        v
    };
    let v = forward(None);
    assert_eq!(v["kernels"]["packed_weights"]["enabled"], onednn, "{v}");
    // Two untimed passes when packing is on (weights are packed on their second product).
    assert_eq!(
        v["vit"]["warm_up_seconds"].as_array().map(|a| a.len()),
        Some(if onednn { 2 } else { 1 }),
        "{v}"
    );
    let v = forward(Some("0"));
    assert_eq!(v["kernels"]["packed_weights"]["enabled"], false, "{v}");
    assert_eq!(v["vit"]["warm_up_seconds"].as_array().map(|a| a.len()), Some(1), "{v}");
}

/// oneDNN's OpenMP threads sleep soon after a product (`OMP_WAIT_POLICY=passive` and a short
/// `GOMP_SPINCOUNT`: the binary runs itself again with them) unless the user chose otherwise:
/// OpenMP itself reports what it read (`OMP_DISPLAY_ENV=VERBOSE`; its defaults would show
/// `GOMP_SPINCOUNT = '300000'`).
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn openmp_waits_passively_unless_told_otherwise() {
    // The allocator's setting is the user's here, so that only OpenMP's can make a second run.
    let run = |policy: Option<&str>, spin: Option<&str>| {
        bench_kernels(
            &[],
            &[
                ("OMP_DISPLAY_ENV", Some("VERBOSE")),
                ("OMP_WAIT_POLICY", policy),
                ("GOMP_SPINCOUNT", spin),
                ("GLIBC_TUNABLES", Some("glibc.malloc.hugetlb=0")),
            ],
        )
    };
    let (k, err) = run(None, None);
    if !k["matmul"].as_str().is_some_and(|m| m.starts_with("oneDNN")) {
        // No OpenMP runtime: nothing set, no second run.
        assert!(k["omp_wait_policy"].is_null() && k["omp_settings_by_binary"] == false, "{k}");
        return;
    }
    assert_eq!(k["omp_wait_policy"], "passive", "{k}");
    assert_eq!(k["omp_settings_by_binary"], true, "{k}");
    let spin = k["omp_spin_count"].as_str().expect("the spin count in the JSON").to_string();
    assert!(spin.parse::<u64>().is_ok_and(|n| n < 300_000), "{k}");
    // The runtime of the second run (the one that worked) read both when it was loaded; the
    // first run's OpenMP, loaded before main, shows its defaults.
    let blocks: Vec<&str> = err.split("OPENMP DISPLAY ENVIRONMENT BEGIN").skip(1).collect();
    assert_eq!(blocks.len(), 2, "OpenMP's settings: {err}");
    assert!(blocks[0].contains("GOMP_SPINCOUNT = '300000'"), "OpenMP's defaults: {}", blocks[0]);
    assert!(
        blocks[1].contains("OMP_WAIT_POLICY = 'PASSIVE'"),
        "OpenMP's settings: {}",
        blocks[1]
    );
    assert!(
        blocks[1].contains(&format!("GOMP_SPINCOUNT = '{spin}'")),
        "OpenMP's settings: {}",
        blocks[1]
    );
    // The user's policy: the binary sets nothing (libgomp's active policy spins for long).
    let (k, err) = run(Some("active"), None);
    assert_eq!(k["omp_wait_policy"], "active", "{k}");
    assert_eq!(k["omp_settings_by_binary"], false, "{k}");
    assert!(err.contains("OMP_WAIT_POLICY = 'ACTIVE'"), "OpenMP's settings: {err}");
    assert!(err.contains("GOMP_SPINCOUNT = '30000000000'"), "OpenMP's settings: {err}");
    assert_eq!(err.matches("OPENMP DISPLAY ENVIRONMENT BEGIN").count(), 1, "one run: {err}");
    // The user's spin count alone: the binary sets neither.
    let (k, err) = run(None, Some("123"));
    assert_eq!(k["omp_spin_count"], "123", "{k}");
    assert!(k["omp_wait_policy"].is_null(), "{k}");
    assert!(err.contains("GOMP_SPINCOUNT = '123'"), "OpenMP's settings: {err}");
    assert_eq!(err.matches("OPENMP DISPLAY ENVIRONMENT BEGIN").count(), 1, "one run: {err}");
}

/// glibc's allocator asks for transparent huge pages (the binary runs itself again with
/// `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, added to the user's other tunables) where Linux has
/// them on, and Linux then backs some of the heap with them (`AnonHugePages`); the user's own
/// `glibc.malloc.hugetlb` is left as it is, and with 0 no memory is in huge pages.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn allocator_asks_for_huge_pages_unless_told_otherwise() {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"));
    let (k, err) = bench_kernels(&[], &[("GLIBC_TUNABLES", None)]);
    if !thp {
        // Linux has them off: the binary asks for nothing.
        assert!(k["glibc_tunables"].is_null() && k["huge_pages_by_binary"] == false, "{k} {err}");
        return;
    }
    assert_eq!(k["glibc_tunables"], "glibc.malloc.hugetlb=1", "{k} {err}");
    assert_eq!(k["huge_pages_by_binary"], true, "{k}");
    assert!(
        k["anon_huge_page_bytes"].as_u64().is_some_and(|b| b >= 2 << 20),
        "no huge pages in use: {k}"
    );
    // The user's other tunables stay.
    let (k, err) = bench_kernels(&[], &[("GLIBC_TUNABLES", Some("glibc.malloc.check=0"))]);
    assert_eq!(k["glibc_tunables"], "glibc.malloc.check=0:glibc.malloc.hugetlb=1", "{k} {err}");
    assert_eq!(k["huge_pages_by_binary"], true, "{k}");
    // The user's choice of none.
    let (k, err) = bench_kernels(&[], &[("GLIBC_TUNABLES", Some("glibc.malloc.hugetlb=0"))]);
    assert_eq!(k["glibc_tunables"], "glibc.malloc.hugetlb=0", "{k} {err}");
    assert_eq!(k["huge_pages_by_binary"], false, "{k}");
    let madvise_only = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok_and(|s| s.contains("[madvise]"));
    if madvise_only {
        // Where Linux gives huge pages only to memory that asks (`always` would give some anyway).
        assert_eq!(k["anon_huge_page_bytes"], 0, "huge pages the user turned off: {k}");
    }
}

/// `--matmul-precision` reaches the products' setting (the bench JSON reports it): `highest`
/// by default, `high` when asked; another value is refused, naming the flag.
#[test]
fn matmul_precision_flag_reaches_the_products() {
    let (k, err) = bench_threads(&[]);
    assert_eq!(k["matmul_precision"], "highest", "{k} {err}");
    let (k, err) = bench_threads(&["--matmul-precision", "high"]);
    assert_eq!(k["matmul_precision"], "high", "{k} {err}");
    let out = Command::new(env!("CARGO_BIN_EXE_gcg"))
        .args(["bench", "train-step", "--matmul-precision", "medium"])
        .output()
        .expect("running gcg");
    assert!(!out.status.success(), "--matmul-precision medium is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--matmul-precision"));
}

fn gcg_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gcg")).args(args).output().expect("running gcg");
    assert!(
        out.status.success(),
        "gcg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bench JSON")
}

/// `gcg bench peak` reports each unit this CPU has (and the tile unit fed from L1 and L2 where it
/// has AMX), per thread, on the asked threads; `gcg
/// bench forward` reports the ViT's GFLOP/s from its operation count (the tiny preset's, as
/// PyTorch's counter counts it: tests/fixtures/flops/vit.json) and its share of the probed
/// ceiling, which a real measurement cannot exceed.
#[test]
fn peak_and_the_vits_share_of_it() {
    let v = gcg_json(&["bench", "peak", "--threads", "2", "--seconds", "0.2"]);
    assert_eq!(v["threads"], 2, "{v}");
    let units = v["units"].as_object().expect("units");
    let mut names: Vec<&str> = units.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["amx_bf16", "amx_bf16_l1", "amx_bf16_l2", "bf16_dot", "f32_fma"], "{v}");
    // The tile unit fed from L1 or L2 is probed exactly where its bare rate is.
    for fed in ["amx_bf16_l1", "amx_bf16_l2"] {
        assert_eq!(units[fed].is_null(), units["amx_bf16"].is_null(), "{fed}: {v}");
    }
    for (name, u) in units {
        if u.is_null() {
            continue;
        }
        let per = u["gflops_per_thread"].as_array().expect("per thread");
        assert_eq!(per.len(), 2, "{name}: {u}");
        assert!(u["gflops_all_threads"].as_f64().is_some_and(|g| g > 0.0), "{name}: {u}");
        assert!(u["gflops_one_thread"].as_f64().is_some_and(|g| g > 0.0), "{name}: {u}");
        assert!(u["instruction"].as_str().is_some_and(|s| !s.is_empty()), "{name}: {u}");
    }
    // AVX2 + FMA on this CPU, within GCG_MAX_CPU_ISA's cap if one is set (the child sees it too).
    let fma = gcg::nn::isa::avx2();
    if fma {
        assert!(!units["f32_fma"].is_null(), "{v}");
    }

    let v = gcg_json(&[
        "bench",
        "forward",
        "--preset",
        "tiny",
        "--iters",
        "1",
        "--frames",
        "4",
        "--new-tokens",
        "1",
    ]);
    let vit = &v["vit"];
    let per_frame = vit["gflop_per_frame"].as_f64().expect("gflop_per_frame");
    assert!((per_frame - 1_406_592e-9).abs() < 1e-15, "{vit}");
    let frames = vit["frames"].as_f64().expect("frames");
    let secs = vit["seconds"].as_f64().expect("seconds");
    let gflops = vit["gflops"].as_f64().expect("gflops");
    assert!((gflops - per_frame * frames / secs).abs() <= 1e-9 * gflops, "{vit}");
    if fma {
        // f32 at the default precision: the FMA units' ceiling, which the ViT cannot pass.
        assert_eq!(vit["peak_unit"], "f32_fma", "{vit}");
        assert_eq!(vit["peak_share"], 1.0, "{vit}");
        let share = vit["fraction_of_peak"].as_f64().expect("fraction_of_peak");
        assert!(share > 0.0 && share < 1.0, "{vit}");
    }
    let err = Command::new(env!("CARGO_BIN_EXE_gcg"))
        .args(["bench", "peak", "--seconds", "0.001"])
        .output()
        .expect("running gcg");
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(stderr.contains("--seconds 0.001 must be in [0.05, 60]"), "{stderr}");
}

/// `GCG_MAX_CPU_ISA` reaches the kernels: capped at AVX2, `gcg bench peak` has no AVX512-BF16 or
/// AMX unit and runs its FMA probe on 8-lane (ymm) registers, and the bench JSON names the cap
/// and the level used; a value that is not a level stops the command with an error that names
/// it and lists the levels.
#[test]
fn the_isa_cap_reaches_the_kernels() {
    let run = |cap: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gcg"))
            .args(args)
            .env("GCG_MAX_CPU_ISA", cap)
            .output()
            .expect("running gcg")
    };
    let out = run("avx2", &["bench", "peak", "--threads", "1", "--seconds", "0.1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("peak JSON");
    let units = &v["units"];
    for unit in ["bf16_dot", "amx_bf16", "amx_bf16_l1", "amx_bf16_l2"] {
        assert!(units[unit].is_null(), "{unit} under an AVX2 cap: {v}");
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let instruction = units["f32_fma"]["instruction"].as_str().expect("the FMA unit under an AVX2 cap");
        assert!(instruction.contains("ymm"), "{v}");
    }

    let (k, _) = bench_kernels(&[], &[("GCG_MAX_CPU_ISA", Some("AVX2"))]);
    let isa = &k["cpu_isa"];
    assert_eq!(isa["cap"], "avx2", "{k}");
    assert!(isa["used"] == "avx2" || isa["used"] == "baseline", "{k}");
    assert_eq!(isa["onednn_bf16"], false, "{k}");
    let (k, _) = bench_kernels(&[], &[("GCG_MAX_CPU_ISA", None)]);
    assert_eq!(k["cpu_isa"]["cap"], "amx", "no cap: {k}");

    let out = run("avx3", &["bench", "peak", "--seconds", "0.1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GCG_MAX_CPU_ISA=\"avx3\"") && stderr.contains("baseline, avx2, avx512, avx512_bf16, amx"),
        "{stderr}"
    );
}
