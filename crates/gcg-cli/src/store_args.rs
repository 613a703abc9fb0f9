//! What the commands that write into the feature store (`gcg features`, `gcg labels`) share: the
//! writer's options from their flags and the end-of-job report.
//!
//! Test hook: `GCG_STORE_FAULT=point:N[:abort|error]` crashes the store writer the N-th time it
//! reaches `shard-written`, `shard-renamed` or `index-written` (see `gcg::store::Fault`).

use anyhow::{bail, ensure, Context, Result};
use gcg::store::{Fault, WriterOptions};

/// The store writer's options: `--shard-mb` (MiB buffered before a shard is written), the
/// longest time buffered work waits (seconds), and the `GCG_STORE_FAULT` test hook.
pub fn writer_options(shard_mb: f64, flush_secs: f64) -> Result<WriterOptions> {
    ensure!(shard_mb >= 0.0, "--shard-mb must not be negative");
    let fault = match std::env::var("GCG_STORE_FAULT") {
        Ok(s) if !s.is_empty() => Some(Fault::parse(&s).context("GCG_STORE_FAULT")?),
        _ => None,
    };
    Ok(WriterOptions {
        shard_bytes: (shard_mb * (1 << 20) as f64) as u64,
        max_pending_secs: flush_secs,
        fault,
    })
}

/// Prints a summary and the failures (but for `unlisted` more, summed up already); an error
/// (non-zero exit) if anything failed.
pub fn finish_report(done: usize, skipped: usize, failed: &[(String, String)], unlisted: usize, what: &str) -> Result<()> {
    let n_failed = failed.len() + unlisted;
    eprintln!("{done} {what} done, {skipped} already stored, {n_failed} failed");
    if n_failed == 0 {
        return Ok(());
    }
    for (id, err) in failed {
        eprintln!("  {id}: {err}");
    }
    let total = done + skipped + n_failed;
    if done + skipped == 0 {
        bail!("all {total} {what} failed (listed above); nothing was stored");
    }
    bail!("{n_failed} of {total} {what} failed (listed above); the others are stored")
}
