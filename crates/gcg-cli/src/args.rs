//! Arguments several commands share, typed and documented once, and the one progress-bar style.
//!
//! A flag that names a choice is parsed by clap into the library's enum (its `FromStr`), so a
//! wrong value is a usage error that lists the choices, and the command reads a typed value.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::Args;
use gcg::data::Dataset;
use gcg::run::{DeviceKind, Precision};
use indicatif::{ProgressBar, ProgressStyle};

/// `--device` and `--dtype`, read by the run config's rules.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where to run: cpu | cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// Compute dtype: f32 | bf16 | f16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long)]
    pub dtype: Option<Precision>,
}

impl DeviceArgs {
    /// The device and the dtype asked for (or the device's default).
    pub fn open(&self) -> Result<(Device, DType)> {
        let dev = self.device.open()?;
        let dt = Precision::resolve(self.dtype, &dev);
        Ok((dev, dt))
    }
}

/// `--quiet`: no progress bars, log lines instead.
#[derive(Args, Debug, Clone, Copy)]
pub struct QuietArg {
    /// No progress bars (log lines instead).
    #[arg(long)]
    pub quiet: bool,
}

/// `--random-weights` and `--seed`: seeded random networks instead of checkpoints.
#[derive(Args, Debug, Clone, Copy)]
pub struct RandomWeightsArgs {
    /// Seeded random weights instead of checkpoints (tests, benchmarks).
    #[arg(long)]
    pub random_weights: bool,
    /// Seed of --random-weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `--seed` of a benchmark (`gcg bench ...`): its random weights and data.
#[derive(Args, Debug, Clone, Copy)]
pub struct BenchSeedArg {
    /// Seed of the random weights and data (same seed → same numbers).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `--dataset` of `gcg labels`: a benchmark's published files, or gcg's own JSON samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnotationFormat {
    /// A benchmark's annotation files, read by `gcg::data`.
    Benchmark(Dataset),
    /// A JSON array, or JSON lines, of gcg `QaSample` objects.
    Json,
}

impl std::str::FromStr for AnnotationFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("json") {
            return Ok(Self::Json);
        }
        s.parse::<Dataset>()
            .map(Self::Benchmark)
            .map_err(|_| anyhow::anyhow!("unknown dataset {s:?} (expected {} or json)", Dataset::NAMES.join(", ")))
    }
}

impl std::fmt::Display for AnnotationFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Benchmark(d) => d.fmt(f),
            Self::Json => f.write_str("json"),
        }
    }
}

/// A frame size on the command line: `N` (square) or `WxH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSize {
    pub width: u32,
    pub height: u32,
}

impl std::str::FromStr for FrameSize {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parse = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| anyhow::anyhow!("`{s}`: expected N or WxH (pixels)"))
        };
        let (width, height) = match s.split_once(['x', 'X']) {
            Some((w, h)) => (parse(w)?, parse(h)?),
            None => {
                let n = parse(s)?;
                (n, n)
            }
        };
        Ok(Self { width, height })
    }
}

impl std::fmt::Display for FrameSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A progress bar in the tool's one style (hidden when quiet): `{prefix} [bar] pos/len {msg}`.
/// Commands set the prefix (what runs) and the message (the current item) themselves.
pub fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_formats_parse_and_print_back() {
        for s in [
            "nextqa",
            "nextgqa",
            "intentqa",
            "causalvidqa",
            "star",
            "trafficqa",
            "vlep",
            "open-ended",
            "json",
        ] {
            let f: AnnotationFormat = s.parse().unwrap();
            assert_eq!(f.to_string(), s);
        }
        assert_eq!(
            "msvd-qa".parse::<AnnotationFormat>().unwrap(),
            AnnotationFormat::Benchmark(Dataset::OpenEnded)
        );
        let err = "csv".parse::<AnnotationFormat>().unwrap_err().to_string();
        assert!(err.contains("or json"), "{err}");
    }

    #[test]
    fn frame_sizes_are_n_or_w_by_h() {
        assert_eq!("64".parse::<FrameSize>().unwrap(), FrameSize { width: 64, height: 64 });
        assert_eq!("640x360".parse::<FrameSize>().unwrap().to_string(), "640x360");
        assert_eq!("32X16".parse::<FrameSize>().unwrap(), FrameSize { width: 32, height: 16 });
        assert!("64x".parse::<FrameSize>().is_err());
        assert!("big".parse::<FrameSize>().is_err());
    }
}

/// An output must not be one of the command's inputs (`--json` over the annotations, `--out`
/// over the video): `inputs` are (what, path) pairs, compared after resolving them. An input
/// that is a folder (a feature store, a run's checkpoints) also covers everything inside it, and
/// an output folder must not hold an input (`gcg frames --out` above its `--video`: replacing
/// the folder would delete the video).
pub fn check_not_an_input(flag: &str, out: &std::path::Path, inputs: &[(&str, Option<&std::path::Path>)]) -> Result<()> {
    let resolve = |p: &std::path::Path| {
        p.canonicalize().unwrap_or_else(|_| {
            // Not there yet: its folder resolved, then its name.
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            dir.join(p.file_name().unwrap_or_default())
        })
    };
    let o = resolve(out);
    for (name, p) in inputs {
        let Some(p) = p else { continue };
        let i = resolve(p);
        if i == o {
            bail!(
                "{flag} {} is also the {name} input; writing it would destroy that file — give another path",
                out.display()
            );
        }
        if i.is_dir() && o.starts_with(&i) {
            bail!(
                "{flag} {} lies inside the {name} ({}); writing there could destroy what it holds — give a path outside it",
                out.display(),
                p.display()
            );
        }
        if o.is_dir() && i.starts_with(&o) {
            bail!(
                "{flag} {} holds the {name} input ({}); replacing it would delete that input — give a path outside it",
                out.display(),
                p.display()
            );
        }
    }
    Ok(())
}

/// `--out` must not exist unless `--force` was given (checked before any work is done).
pub fn check_out(out: &std::path::Path, force: bool) -> Result<()> {
    // Through links: what would be replaced is what a link points to (a dangling one: nothing).
    let target = gcg::util::through_links(out)?;
    if let (Ok(meta), false) = (target.symlink_metadata(), force) {
        let what = if meta.is_dir() { "folder" } else { "file" };
        bail!("{} already exists (a {what}); pass --force to replace it", out.display());
    }
    Ok(())
}
