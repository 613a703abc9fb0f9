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
    #[command(subcommand)]
    command: Command,
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

/// oneDNN's OpenMP threads wait for the next product asleep rather than spinning
/// (`OMP_WAIT_POLICY=passive`, unless the user set it): between two products the other core runs
/// candle's ops, which the spinning OpenMP thread would slow down (a bf16 grounded answer on 2
/// cores: 3.0–3.3 s against 4.0–4.1 s). OpenMP reads the variable once, when it is loaded, before
/// `main`; an executable's `.preinit_array` runs before any library's initialisers.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[link_section = ".preinit_array"]
static SET_OMP_WAIT_POLICY: extern "C" fn() = set_omp_wait_policy;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" fn set_omp_wait_policy() {
    // SAFETY: runs before any other code of the process (one thread); both strings are
    // NUL-terminated and setenv copies them.
    unsafe {
        if libc::getenv(c"OMP_WAIT_POLICY".as_ptr()).is_null() {
            libc::setenv(c"OMP_WAIT_POLICY".as_ptr(), c"passive".as_ptr(), 0);
            OMP_PASSIVE_BY_DEFAULT.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Whether the binary chose `OMP_WAIT_POLICY=passive` (the variable itself is gone from the
/// environment by `main`: the C library resets it while it starts).
pub static OMP_PASSIVE_BY_DEFAULT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// OpenMP's wait policy for this process: the user's `OMP_WAIT_POLICY`, or the binary's choice.
pub fn omp_wait_policy() -> Option<String> {
    std::env::var("OMP_WAIT_POLICY").ok().or_else(|| {
        OMP_PASSIVE_BY_DEFAULT
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| "passive".to_string())
    })
}

fn main() {
    restore_sigpipe();
    gcg::util::keep_freed_memory();
    let cli = Cli::parse();
    // The demo's networks are tiny: one thread per op is faster than two (198 s against 282 s
    // for `gcg demo --seed 0` on 2 cores, the same results).
    let demo_default = matches!(cli.command, Command::Demo(_)) && std::env::var_os("RAYON_NUM_THREADS").is_none();
    gcg::util::fix_thread_count(cli.threads.or(demo_default.then_some(1)));
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
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
