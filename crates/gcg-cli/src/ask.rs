//! `gcg ask`: a question about a video (a file or a frame folder) → the answer and the moments,
//! in seconds, that support it.

use crate::ask_args::AskModelArgs;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use gcg::ask::{describe, Question};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct AskArgs {
    #[command(flatten)]
    model: AskModelArgs,
    /// The video: a file ffmpeg decodes, a frame folder (frame_{i}.jpg|png) or a .safetensors
    /// of pre-decoded frames.
    #[arg(long)]
    video: PathBuf,
    /// The question.
    #[arg(long, required_unless_present = "questions_file", conflicts_with = "questions_file")]
    question: Option<String>,
    /// A candidate answer (repeat for each; none: an open-ended question, the answer is generated).
    #[arg(long = "option", value_name = "TEXT", conflicts_with = "questions_file")]
    options: Vec<String>,
    /// The candidate answers, one a line (instead of --option).
    #[arg(long, conflicts_with_all = ["options", "questions_file"])]
    options_file: Option<PathBuf>,
    /// Several questions about the video, answered in batches: a JSON array or JSON Lines of
    /// {"question": "...", "options": ["...", ...]}.
    #[arg(long)]
    questions_file: Option<PathBuf>,
    /// Print each answer as one JSON object a line (question, answer, answer_index, options,
    /// option_scores, moments, span, timestamps, p, seconds, notes).
    #[arg(long)]
    json: bool,
}

fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the questions {}", path.display()))?;
    let t = text.trim_start();
    let qs: Vec<Question> = if t.starts_with('[') {
        serde_json::from_str(t).with_context(|| format!("{}: expected a JSON array of {{\"question\", \"options\"}}", path.display()))?
    } else {
        t.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{} line {}: expected {{\"question\", \"options\"}}", path.display(), i + 1))
            })
            .collect::<Result<_>>()?
    };
    ensure!(!qs.is_empty(), "{} holds no questions", path.display());
    for (i, q) in qs.iter().enumerate() {
        q.validate()
            .with_context(|| format!("{} question {} ({:?})", path.display(), i + 1, q.question))?;
    }
    Ok(qs)
}

/// The candidate answers of `--options-file`, one a line (blank lines skipped). A file with none
/// is an error: asking it as an open-ended question would answer something not asked.
fn read_options(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the options {}", path.display()))?;
    let options: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    ensure!(
        !options.is_empty(),
        "the options file {} holds no options (one a line); for an open-ended question give no --options-file",
        path.display()
    );
    Ok(options)
}

pub fn run(a: AskArgs) -> Result<()> {
    let questions = match (&a.question, &a.questions_file) {
        (Some(q), None) => {
            let options = match &a.options_file {
                Some(f) => read_options(f)?,
                None => a.options.clone(),
            };
            let q = Question {
                question: q.clone(),
                options,
            };
            q.validate()?;
            vec![q]
        }
        (None, Some(f)) => read_questions(f)?,
        _ => bail!("give --question or --questions-file"),
    };
    ensure!(a.video.exists(), "the video {} does not exist", a.video.display());
    let (asker, _) = a.model.open(&mut |msg| eprintln!("{msg}"))?;
    let video = asker.prepare(&a.video)?;
    let answers = asker.ask(&video, &questions)?;
    let mut out = std::io::stdout().lock();
    for ans in &answers {
        if a.json {
            writeln!(out, "{}", serde_json::to_string(ans)?)?;
        } else {
            writeln!(out, "{}", describe(ans))?;
        }
    }
    if !a.json {
        let features = if video.cached {
            "features from the ask cache".to_string()
        } else {
            format!(
                "features computed in {:.2} s",
                video.seconds.get("features").copied().unwrap_or(0.0)
            )
        };
        writeln!(out, "({} frames; {features}, {})", video.num_frames, asker.cache.display())?;
    }
    Ok(())
}
