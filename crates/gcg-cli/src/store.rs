//! `gcg store verify`: check a feature store against its shard files and, when asked, drop what
//! is broken so that `gcg features` / `gcg labels` recompute it.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use gcg::store::{consistency, dropped_counts, CheckOptions, Store, StoreCheck, StoreWriter, WriterOptions, RECOMPUTE_HINT};
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Check every shard the index lists (exists, size, header; with --checksums every byte,
    /// with --values every value finite); exit 1 when something is broken, unless --repair.
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The feature store directory.
    #[arg(long)]
    store: PathBuf,
    /// Also compare each shard's CRC-32 with the one recorded when it was written (reads every byte).
    #[arg(long)]
    checksums: bool,
    /// Also check that every stored feature, embedding, curve and time is finite (reads every byte).
    #[arg(long)]
    values: bool,
    /// Drop the broken shards and records from the index (broken files, and shard files no index
    /// lists, go to STORE/quarantine/); `gcg features` and `gcg labels` then recompute them. A
    /// store whose index.json was lost gets it rebuilt from its shards.
    #[arg(long)]
    repair: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(c: StoreCommand) -> Result<()> {
    match c {
        StoreCommand::Verify(a) => verify(a),
    }
}

fn verify(a: VerifyArgs) -> Result<()> {
    if a.store.is_file() {
        bail!(
            "--store {} is a file, not a feature-store directory (give the directory holding index.json and shards/)",
            a.store.display()
        );
    }
    // A store that lost its index is rebuilt from its shards first (with --repair).
    let lost = gcg::store::lost_index_shards(&a.store)?;
    let rebuilt = if lost > 0 {
        if !a.repair {
            bail!("{}", gcg::store::lost_index_message(&a.store, lost));
        }
        let r = gcg::store::rebuild_index(&a.store)?;
        if !a.json {
            println!(
                "rebuilt the lost index of {} from {} of its {lost} shards: {} videos, {} questions ({} superseded records left out)",
                a.store.display(),
                r.shards,
                r.videos,
                r.questions,
                r.superseded
            );
            for (name, why, to) in &r.quarantined {
                println!("could not read back shard {name} ({why}); moved to {}", to.display());
            }
        }
        Some(r)
    } else {
        None
    };
    let store = Store::open(&a.store)?;
    let opts = CheckOptions {
        headers: true,
        checksums: a.checksums,
        // A rebuilt index may hold records the lost one had dropped (non-finite values): read them.
        values: a.values || rebuilt.is_some(),
    };
    let snap = store.snapshot();
    let found = snap.check(opts)?;
    let mixed = consistency(snap.index());
    let repaired = if a.repair && (!found.is_clean() || !found.unlisted.is_empty()) {
        // Opening a writer already drops the records of missing or cut shards; the rest is
        // checked again on the index it leaves, and the two repairs reported as one.
        let mut w = StoreWriter::open(&a.store, WriterOptions::default())?;
        let first = w.opened_repair().map(|(_, r)| r.clone());
        let rest = gcg::store::check(&a.store, w.index(), opts)?;
        let mut r = w.repair(&rest)?;
        if let Some(f) = first {
            r.shards.splice(0..0, f.shards);
            r.videos.splice(0..0, f.videos);
            r.questions.splice(0..0, f.questions);
        }
        Some(r)
    } else {
        None
    };
    if a.json {
        let mut out = report_json(&found);
        out["mixed"] = json!(mixed.mixed);
        out["unknown_provenance"] = json!({"videos": mixed.unknown_videos, "questions": mixed.unknown_questions});
        if let Some(r) = &repaired {
            out["repaired"] = json!({
                "shards": r.shards.iter().map(|(n, to)| json!({"shard": n, "moved_to": to})).collect::<Vec<_>>(),
                "videos": r.videos,
                "questions": r.questions,
                "moved_unlisted": r.moved_unlisted.iter().map(|(n, to)| json!({"shard": n, "moved_to": to})).collect::<Vec<_>>(),
            });
        }
        if let Some(r) = &rebuilt {
            out["rebuilt"] = json!({
                "shards": r.shards,
                "videos": r.videos,
                "questions": r.questions,
                "superseded": r.superseded,
                "quarantined": r.quarantined.iter().map(|(n, why, to)| json!({"shard": n, "why": why, "moved_to": to})).collect::<Vec<_>>(),
            });
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_report(&a, &found, !mixed.mixed.is_empty());
        for m in &mixed.mixed {
            println!("mixed: {m}");
        }
        if mixed.unknown_videos + mixed.unknown_questions > 0 {
            println!(
                "{} videos and {} questions have no recorded provenance (written by an older gcg; not compared)",
                mixed.unknown_videos, mixed.unknown_questions
            );
        }
        if let Some(r) = &repaired {
            for (name, to) in &r.shards {
                match to {
                    Some(p) => println!("dropped shard {name} (moved to {})", p.display()),
                    None => println!("dropped shard {name} (its file was missing)"),
                }
            }
            println!(
                "dropped {} from the index; {RECOMPUTE_HINT}, with the same settings that made them{}",
                dropped_counts(&r.videos, &r.questions),
                if r.moved_unlisted.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; moved {} unlisted shard files to {}",
                        r.moved_unlisted.len(),
                        a.store.join(gcg::store::QUARANTINE_DIR).display()
                    )
                }
            );
        }
    }
    if !mixed.mixed.is_empty() {
        bail!(
            "the feature store {} mixes records made differently (listed above): one store must hold features of one T \
             made by one extractor, and labels of one text encoder; recompute the odd ones with --overwrite \
             (`gcg features`, `gcg labels`) or split the store",
            a.store.display()
        );
    }
    if !found.is_clean() && repaired.is_none() {
        bail!(
            "the feature store {} is damaged (listed above); `gcg store verify --repair{}{}` drops the broken records \
             so that `gcg features` / `gcg labels` recompute them",
            a.store.display(),
            if a.checksums { " --checksums" } else { "" },
            if a.values { " --values" } else { "" },
        );
    }
    Ok(())
}

fn print_report(a: &VerifyArgs, found: &StoreCheck, mixed: bool) {
    let depth = match (a.checksums, a.values) {
        (false, false) => "files, sizes and headers",
        (true, false) => "files, sizes, headers and checksums",
        (false, true) => "files, sizes, headers and values",
        (true, true) => "files, sizes, headers, checksums and values",
    };
    println!(
        "{}: {} shards, {} videos, {} questions; checked {depth}",
        a.store.display(),
        found.shards,
        found.videos,
        found.questions
    );
    if found.is_clean() && !mixed {
        println!(
            "{}",
            if a.checksums {
                "ok"
            } else {
                "ok (checksums not read: --checksums reads every byte)"
            }
        );
    } else if found.is_clean() {
        println!("every shard reads as the index says");
    } else {
        println!("{}", found.describe());
    }
    if found.without_checksum > 0 {
        println!(
            "{} shards were written without a checksum (older gcg) and were not checksum-checked",
            found.without_checksum
        );
    }
    if !found.unlisted.is_empty() {
        println!(
            "{} shard files are not in the index (left by writers stopped before publishing them, or being published by a \
             running one; their records were or will be redone: --repair moves those of stopped writers to {})",
            found.unlisted.len(),
            a.store.join(gcg::store::QUARANTINE_DIR).display()
        );
    }
}

fn report_json(found: &StoreCheck) -> serde_json::Value {
    json!({
        "clean": found.is_clean(),
        "checked": {"headers": found.options.headers, "checksums": found.options.checksums, "values": found.options.values},
        "shards": found.shards,
        "videos": found.videos,
        "questions": found.questions,
        "broken": found.broken.iter().map(|b| json!({"shard": b.name, "kind": format!("{:?}", b.kind).to_lowercase(), "fault": b.fault.to_string()})).collect::<Vec<_>>(),
        "lost_videos": found.lost_videos,
        "lost_questions": found.lost_questions,
        "non_finite": found.non_finite.iter().map(|r| json!({"kind": r.kind, "id": r.id, "tensor": r.tensor, "detail": r.detail})).collect::<Vec<_>>(),
        "unlisted": found.unlisted,
        "without_checksum": found.without_checksum,
    })
}
