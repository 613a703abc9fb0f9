//! `gcg` — the command-line tool: one subcommand per stage of the pipeline.

// Shared by several commands: argument groups, store-writer options, printed reports.
mod args;
mod ask_args;
mod report;
mod store_args;

// One file per subcommand (`bench_*`: the `gcg bench` subcommands).
mod ask;
mod bench;
mod bench_decode;
mod bench_serve;
mod bench_store;
mod check_weights;
mod demo;
mod eval;
mod features;
mod frames;
mod labels;
mod predict;
mod serve;
mod store;
mod synth;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gcg", version, about = "Grounded VideoQA with Gaussian contrastive grounding (GCG) on InstructBLIP-FlanT5", long_about = None)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, display_order = 1000)]
    verbose: u8,
    /// CPU threads for tensor work: candle's element-wise ops and small products, and oneDNN's
    /// large ones (default: the physical cores, or RAYON_NUM_THREADS; 1 for `gcg demo`, whose tiny
    /// networks run faster on one thread: their ops are too small to split).
    #[arg(long, global = true, display_order = 999, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    threads: Option<usize>,
    /// How f32 matrix products are computed, as torch's set_float32_matmul_precision: highest
    /// (in f32) or high (on a CPU with AMX-BF16, each f32 operand as the sum of two bf16 numbers,
    /// three bf16 products summed in f32: within ~1e-5 of the f32 result's size, ~1.7x faster for
    /// the ViT; f32 elsewhere).
    #[arg(long, global = true, value_enum, default_value_t = MatmulPrecision::Highest, display_order = 998)]
    matmul_precision: MatmulPrecision,
    #[command(subcommand)]
    command: Command,
}

/// The values of `--matmul-precision` (see `gcg::nn::linear::MatmulPrecision`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum MatmulPrecision {
    Highest,
    High,
}

#[derive(Subcommand)]
enum Command {
    /// Ask about a video: the answer and the moments (in seconds) that support it.
    Ask(ask::AskArgs),
    /// Measure speed; prints JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Load a checkpoint (HF snapshot or GCG release directory), check every tensor against the
    /// model's shapes and report what it holds.
    CheckWeights(check_weights::CheckWeightsArgs),
    /// Compute (or import) the frozen ViT features and CLIP frame embeddings of videos into a
    /// feature store; resumable, parallel over videos.
    Features(features::FeaturesArgs),
    /// CLIP text embeddings and pseudo-labels (top-K frames for the event text) of a dataset's
    /// questions, into the feature store.
    Labels(labels::LabelsArgs),
    /// The whole pipeline on a built-in synthetic grounded VideoQA world (no downloads): report in --out.
    Demo(demo::DemoArgs),
    /// Score a prediction file (JSONL) with a benchmark's official metrics.
    Eval(eval::EvalArgs),
    /// Sample T frames from a video (or frame folder) into frame_{i}.jpg + frames.json.
    Frames(frames::FramesArgs),
    /// Train GCG (uniform, oracle or grounding mode) from a run config; resumable.
    Train(train::TrainArgs),
    /// Answer a split with a trained run (or a pretrained model): predictions JSONL + metrics.
    Predict(predict::PredictArgs),
    /// Serve the HTTP API and the web viewer: upload a video, ask, see the moments.
    Serve(serve::ServeArgs),
    /// Look after a feature store: `gcg store verify [--checksums] [--values] [--repair]`.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Write a synthetic grounded VideoQA world (NExT-QA / NExT-GQA files, frames, mp4s, captions).
    Synth(synth::SynthArgs),
}

/// Settings that a library reads from the environment once, while it is loaded before `main`,
/// so that the only way to set them for this process is to run the binary again with them:
/// `main` does that first, once (the marker [`RERUN_MARKER`] keeps it from happening twice),
/// for whichever of them the user did not set. If the new run cannot start, this one carries on
/// with the libraries' defaults.
///
/// * oneDNN's OpenMP threads go to sleep soon after a product instead of spinning for the next
///   (`OMP_WAIT_POLICY=passive`, `GOMP_SPINCOUNT` of [`OMP_SPIN_COUNT`]) unless the user set
///   either: between two products the other core runs candle's ops, which a spinning OpenMP
///   thread slows down (libgomp's default spins ~3 ms; a bf16 grounded answer on 2 cores took
///   2.7–2.9 s with it against 2.3–2.7 s with these settings).
/// * glibc's allocator asks Linux for transparent huge pages (2 MiB) for the
///   heap (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, added to the user's tunables unless they
///   name `glibc.malloc.hugetlb`; not where Linux has them off, `never`): with 4 KiB pages the
///   products' strided reads of weights and activations and their writes of the outputs missed
///   the TLB, and the bf16 ViT-g took 14% longer (1.92 against 2.18 frames/s, 4 frames a pass).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rerun_with_library_settings() {
    use std::os::unix::process::CommandExt;
    if let Some(set) = std::env::var_os(RERUN_MARKER) {
        let set = set.to_string_lossy().to_string();
        // SAFETY: the process has one thread here (the start of main).
        unsafe { std::env::remove_var(RERUN_MARKER) };
        let by_binary = |what: &str| set.split(',').any(|s| s == what);
        OMP_SET_BY_BINARY.store(by_binary("openmp"), std::sync::atomic::Ordering::Relaxed);
        HUGE_PAGES_BY_BINARY.store(by_binary("huge-pages"), std::sync::atomic::Ordering::Relaxed);
        return;
    }
    let mut env: Vec<(&str, String)> = Vec::new();
    let mut set = Vec::new();
    let omp_user = std::env::var_os("OMP_WAIT_POLICY").is_some() || std::env::var_os("GOMP_SPINCOUNT").is_some();
    if gcg::nn::linear::ONEDNN && !omp_user {
        env.push(("OMP_WAIT_POLICY", "passive".into()));
        env.push(("GOMP_SPINCOUNT", OMP_SPIN_COUNT.into()));
        set.push("openmp");
    }
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if !tunables.contains("glibc.malloc.hugetlb") && transparent_huge_pages_available() {
        let add = "glibc.malloc.hugetlb=1";
        env.push((
            "GLIBC_TUNABLES",
            if tunables.is_empty() {
                add.into()
            } else {
                format!("{tunables}:{add}")
            },
        ));
        set.push("huge-pages");
    }
    if set.is_empty() {
        return; // the user's choices, or nothing to set in this build and on this system
    }
    let mut args = std::env::args_os();
    let Some(arg0) = args.next() else { return };
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .envs(env)
        .env(RERUN_MARKER, set.join(","))
        .exec();
    eprintln!("gcg: note: could not restart with its settings for OpenMP and the allocator ({err}); carrying on with their defaults");
}

/// Whether Linux may give this process transparent huge pages when it asks (`always` or
/// `madvise`; not `never`, nor a kernel without them).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn transparent_huge_pages_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

/// Rounds an idle OpenMP thread spins before it sleeps (libgomp counts ~100 per µs).
pub const OMP_SPIN_COUNT: &str = "10000";

/// Set (and removed again) by [`rerun_with_library_settings`] for the run it starts: the
/// settings it chose, comma-separated (`openmp`, `huge-pages`).
const RERUN_MARKER: &str = "GCG_SETTINGS_BY_BINARY";

/// Whether this process runs with the OpenMP settings the binary chose.
static OMP_SET_BY_BINARY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process runs with the allocator's huge pages because the binary asked for them.
static HUGE_PAGES_BY_BINARY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// OpenMP's wait policy for this process (the user's or the binary's); `None`: OpenMP's default.
pub fn omp_wait_policy() -> Option<String> {
    std::env::var("OMP_WAIT_POLICY").ok()
}

/// libgomp's spin count for this process (the user's or the binary's); `None`: OpenMP's default.
pub fn omp_spin_count() -> Option<String> {
    std::env::var("GOMP_SPINCOUNT").ok()
}

/// Whether the OpenMP settings are the binary's choice rather than the user's.
pub fn omp_settings_by_binary() -> bool {
    OMP_SET_BY_BINARY.load(std::sync::atomic::Ordering::Relaxed)
}

/// glibc's tunables for this process (`GLIBC_TUNABLES`: the user's, with the binary's
/// `glibc.malloc.hugetlb=1` added where it asked for huge pages); `None`: glibc's defaults.
pub fn glibc_tunables() -> Option<String> {
    std::env::var("GLIBC_TUNABLES").ok()
}

/// Whether the allocator's huge pages are the binary's choice rather than the user's.
pub fn huge_pages_by_binary() -> bool {
    HUGE_PAGES_BY_BINARY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Memory of this process held in transparent huge pages now (Linux `AnonHugePages`), in bytes.
pub fn anon_huge_page_bytes() -> Option<u64> {
    proc_self_kb_field("smaps_rollup", "AnonHugePages")
}

/// The peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_self_kb_field("status", "VmHWM")
}

/// A `Field:   N kB` line of `/proc/self/<file>`, in bytes; `None` where it is missing.
fn proc_self_kb_field(file: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/{file}")).ok()?;
    let rest = s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Huge pages for every command. (The demo and `gcg train` once took 13% longer with
        // them, but that was the kernel's work for a training graph that leaked, fixed in
        // commit 660e508: since then the demo takes the same time either way, 139–145 s with
        // huge pages against 142–153 s without, runs interleaved.)
        rerun_with_library_settings();
    }
    restore_sigpipe();
    let cli = Cli::parse();
    // One heap for every thread, except where threads train side by side (the demo, `gcg
    // train`): they would wait on its lock.
    gcg::util::keep_freed_memory(!matches!(cli.command, Command::Demo(_) | Command::Train(_)));
    // The demo's networks are tiny: one thread per op is faster than two (198 s against 282 s
    // for `gcg demo --seed 0` on 2 cores, the same results).
    let demo_default = matches!(cli.command, Command::Demo(_)) && std::env::var_os("RAYON_NUM_THREADS").is_none();
    gcg::util::fix_thread_count(cli.threads.or(demo_default.then_some(1)));
    // Frozen weights packed for oneDNN's kernel (nn::linear::PackSlot) cost their memory again:
    // not while training, whose activations need it (GCG_PACK_WEIGHTS=1 overrides).
    gcg::nn::linear::set_pack_weights(!matches!(
        cli.command,
        Command::Demo(_) | Command::Train(_) | Command::Bench(bench::BenchCommand::TrainStep(_))
    ));
    gcg::nn::linear::set_matmul_precision(match cli.matmul_precision {
        MatmulPrecision::Highest => gcg::nn::linear::MatmulPrecision::Highest,
        MatmulPrecision::High => gcg::nn::linear::MatmulPrecision::High,
    });
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log redirected to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A wrong GCG_MAX_CPU_ISA or GCG_ONEDNN_F32 stops the command here, before any kernel is
    // chosen.
    let checked = gcg::nn::isa::check_env().and_then(|_| gcg::nn::linear::check_onednn_f32_env());
    if let Err(e) = checked.and_then(|_| run(cli)) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

/// End quietly, as other Unix tools do, when whoever reads our output goes away (`gcg … | head`):
/// Rust ignores SIGPIPE, so a write to a closed pipe would otherwise panic.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ask(a) => ask::run(a),
        Command::Bench(b) => bench::run(b),
        Command::CheckWeights(a) => check_weights::run(a),
        Command::Features(a) => features::run(a),
        Command::Labels(a) => labels::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Frames(a) => frames::run_frames(a),
        Command::Train(a) => train::run_train(a),
        Command::Predict(a) => predict::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Store(c) => store::run(c),
        Command::Synth(a) => synth::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bench_sizes_are_refused_by_name_outside_their_range() {
        use clap::Parser;
        for args in [
            &["bench", "forward", "--batch", "0"][..],
            &["bench", "forward", "--batch", "1000000"],
            &["bench", "forward", "--k", "0"],
            &["bench", "forward", "--vit-frames", "0"],
            &["bench", "forward", "--iters", "0"],
            &["bench", "train-step", "--batch", "0"],
            &["bench", "store", "--epochs", "0"],
            &["bench", "serve", "--clients", "0"],
            &["bench", "serve", "--requests", "0"],
        ] {
            let e = Cli::try_parse_from(std::iter::once("gcg").chain(args.iter().copied())).err();
            let e = e.unwrap_or_else(|| panic!("{args:?} was accepted")).to_string();
            assert!(e.contains(args[2]) && e.contains(args[3]), "{args:?}: {e}");
        }
    }

    /// Every subcommand (at any depth) and every argument it takes says what it is: clap's help
    /// comes from the `///` comments, so a flag or command without one fails here.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn has_help(s: Option<&clap::builder::StyledStr>) -> bool {
            s.is_some_and(|h| !h.to_string().trim().is_empty())
        }
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>, seen: &mut usize) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                *seen += 1;
                if !has_help(arg.get_help()) {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && !has_help(sub.get_about()) {
                    missing.push(format!("{sub_path} (the subcommand)"));
                }
                walk(sub, &sub_path, missing, seen);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let (mut missing, mut seen) = (Vec::new(), 0);
        walk(&cmd, "gcg", &mut missing, &mut seen);
        assert!(seen > 100, "only {seen} arguments walked: is the walk reaching the subcommands?");
        assert!(missing.is_empty(), "without help text:\n  {}", missing.join("\n  "));
    }
}
