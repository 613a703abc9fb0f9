//! Arguments several commands share, typed and documented once.

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use gcg::run::{DeviceKind, Precision};
use indicatif::{ProgressBar, ProgressStyle};

/// `--device` and `--dtype`, read by the run config's rules.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where to run: cpu | cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// Compute dtype of the frozen networks: f32 | bf16 | f16 (default: f32 on cpu, bf16 on cuda).
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

/// A progress bar with the tool's style (hidden when quiet).
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
