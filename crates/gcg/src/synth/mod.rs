//! A synthetic grounded VideoQA world (`gcg synth`): small videos in which the answer to every
//! question is visible ONLY during a short event, so that choosing the right frames matters.
//!
//! # The world
//! Each video has `frames` frames of `width`×`height` pixels at `fps` frames per second
//! (frame `i` is shown at `i / fps` seconds). On a plain light background, a few muted grey
//! circles (the distractors) bounce around for the whole video. `events` times per video an
//! *event* happens: a shape (square, triangle, cross, diamond, star, heart) in a saturated colour
//! (red, green, blue, yellow, purple, orange) appears in one of five places (top left, top right,
//! bottom left, bottom right, middle), stays for 6–8 frames (`event_frames`) while drifting a few
//! pixels, and leaves. Events of a video never overlap, are separated by at least `event_gap`
//! frames, and have pairwise different shapes AND colours (so "the square" or "the red thing"
//! names one event). Distractors never use an event colour or shape: outside its event, nothing in
//! the video shows the answer.
//!
//! # Questions (5 options, NExT-QA type codes)
//! | kind | question | answer | type |
//! |---|---|---|---|
//! | [`QuestionKind::Color`] | what color was the square that appeared | red | DO |
//! | [`QuestionKind::Shape`] | what shape was the red thing that appeared | square | DO |
//! | [`QuestionKind::Location`] | where did the red square appear | top left | DL |
//! | [`QuestionKind::After`] | what appeared after the red square | a green cross | TN |
//! | [`QuestionKind::Before`] | what appeared before the green cross | a red square | TP |
//!
//! NExT-QA's codes mean: DO = descriptive "other", DL = descriptive location, DC = descriptive
//! *count* (not colour: there are no counting questions here, since a count is not visible inside
//! one event), TN / TP = temporal next / previous. Wrong options are of the same kind (other
//! colours, shapes, places, or other coloured shapes — half of them sharing the colour or the
//! shape of the answer); the answer's position is uniform over 0–4.
//!
//! **Grounding.** Every question's evidence is the span of its *answer event* — the event whose
//! appearance the answer describes (for "what appeared after the red square": the event that
//! came next, not the red square) — written as one segment `[first, last]` in seconds: the
//! timestamps of the first and the last frame that show the event (closed interval, so a frame is
//! evidence iff its timestamp lies in the span).
//!
//! With the defaults (64 frames, events of 6–8 frames), a model that samples T = 32 frames and
//! keeps K = 4 of them uniformly sees the answer event in well under half of the questions, while
//! every event covers at least 3 of the 32 sampled frames, so a grounding model can find it.
//!
//! # Texts
//! [`statement`] turns a question and its answer into a declarative sentence ("the square that
//! appeared was red"), [`question_answer_text`] into "question? answer"; [`frame_captions`] lists
//! true captions of a frame (used to pre-train a tiny CLIP) covering all three event-text forms.
//!
//! # Files
//! [`write_world`] writes the dataset (NExT-QA CSVs, NExT-GQA `gsub` files, frame folders, mp4s,
//! `world.json`, `captions.jsonl`); see there.

mod render;
mod write;

pub use render::{render_frame, render_video, shape_contains};
pub use write::{write_world, Mp4Mode, WriteOptions, WriteSummary};

use crate::rng::SeededRng;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Everything that defines a synthetic world; the same config (seed included) gives byte-identical
/// files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub seed: u64,
    /// Number of videos (all splits).
    pub videos: usize,
    /// Share of the videos in the validation and test splits (the rest is training); the splits
    /// are contiguous runs of video ids: train, then val, then test.
    pub val_fraction: f64,
    pub test_fraction: f64,
    /// Frames per video (T').
    pub frames: usize,
    pub fps: f64,
    /// Frame size in pixels (even, for H.264).
    pub width: u32,
    pub height: u32,
    /// Background colour (muted: its channels differ by at most 40).
    pub background: [u8; 3],
    /// Moving grey circles per video.
    pub distractors: usize,
    /// Radius range of the distractors in pixels.
    pub distractor_radius: [f64; 2],
    /// Speed range of the distractors in pixels per frame.
    pub distractor_speed: [f64; 2],
    /// Events per video (non-overlapping, in temporal order).
    pub events: usize,
    /// Event length range in frames (inclusive): each event lasts a uniform draw from it.
    pub event_frames: [usize; 2],
    /// At least this many event-free frames between two events.
    pub event_gap: usize,
    /// Size of an event shape (its bounding box side) in pixels.
    pub event_size: u32,
    /// How far (pixels, at most) an event's shape drifts while it is visible; 0 = still.
    pub event_motion: f64,
    /// Questions per video (at most the number of distinct questions a video allows).
    pub questions_per_video: usize,
    /// The question kinds to ask.
    pub kinds: Vec<QuestionKind>,
    /// `captions.jsonl` covers every n-th frame of every video (1 = all frames).
    pub caption_every: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            videos: 200,
            val_fraction: 0.15,
            test_fraction: 0.15,
            frames: 64,
            fps: 8.0,
            width: 64,
            height: 64,
            background: [222, 222, 214],
            distractors: 3,
            distractor_radius: [4.0, 7.0],
            distractor_speed: [0.6, 1.8],
            events: 2,
            event_frames: [6, 8],
            event_gap: 4,
            event_size: 20,
            event_motion: 4.0,
            questions_per_video: 4,
            kinds: QuestionKind::ALL.to_vec(),
            caption_every: 1,
        }
    }
}

impl SynthConfig {
    /// Check the config; errors say which field is wrong and why.
    pub fn validate(&self) -> Result<()> {
        let [lmin, lmax] = self.event_frames;
        if self.videos == 0 {
            bail!("videos: must be at least 1");
        }
        if !(self.fps.is_finite() && self.fps > 0.0) {
            bail!("fps: must be a positive number, got {}", self.fps);
        }
        for (name, f) in [("val_fraction", self.val_fraction), ("test_fraction", self.test_fraction)] {
            if !(0.0..=1.0).contains(&f) {
                bail!("{name}: must be in [0, 1], got {f}");
            }
        }
        if self.val_fraction + self.test_fraction > 1.0 {
            bail!(
                "val_fraction + test_fraction = {} exceeds 1",
                self.val_fraction + self.test_fraction
            );
        }
        if self.width < 16 || self.height < 16 {
            bail!("frame size {}x{}: both sides must be at least 16 pixels", self.width, self.height);
        }
        let side = self.width.min(self.height);
        // The five places are the centres of the quadrants and of the frame; a shape must fit
        // in a quadrant.
        if self.event_size < 8 || self.event_size > side / 2 - 2 {
            bail!(
                "event_size {}: must be between 8 and {} (half the shorter side {side} minus 2) so that a shape fits in a quadrant",
                self.event_size,
                side / 2 - 2
            );
        }
        if !(self.event_motion.is_finite() && self.event_motion >= 0.0) {
            bail!("event_motion: must be a non-negative number, got {}", self.event_motion);
        }
        if self.events == 0 {
            bail!("events: must be at least 1");
        }
        if self.events > Shape::ALL.len().min(Color::ALL.len()) {
            bail!(
                "events {}: at most {} per video (events of a video have distinct shapes and colours)",
                self.events,
                Shape::ALL.len().min(Color::ALL.len())
            );
        }
        if lmin == 0 || lmin > lmax {
            bail!("event_frames [{lmin}, {lmax}]: expected 1 <= min <= max");
        }
        let needed = self.events * lmax + (self.events - 1) * self.event_gap;
        if needed > self.frames {
            bail!(
                "frames {}: {} events of up to {lmax} frames with gaps of {} need {needed} frames",
                self.frames,
                self.events,
                self.event_gap
            );
        }
        let [rmin, rmax] = self.distractor_radius;
        if !(rmin.is_finite() && rmax.is_finite() && 1.0 <= rmin && rmin <= rmax && 2.0 * rmax < side as f64) {
            bail!(
                "distractor_radius [{rmin}, {rmax}]: expected 1 <= min <= max < {}",
                side as f64 / 2.0
            );
        }
        let [smin, smax] = self.distractor_speed;
        if !(smin.is_finite() && smax.is_finite() && 0.0 <= smin && smin <= smax) {
            bail!("distractor_speed [{smin}, {smax}]: expected 0 <= min <= max");
        }
        let bg = self.background;
        if bg.iter().max().unwrap_or(&0) - bg.iter().min().unwrap_or(&0) > 40 {
            bail!("background {bg:?}: must be a muted colour (channels within 40 of each other)");
        }
        if self.questions_per_video == 0 {
            bail!("questions_per_video: must be at least 1");
        }
        if self.kinds.is_empty() {
            bail!("kinds: at least one question kind is needed");
        }
        if self.events < 2 && self.kinds.iter().all(|k| k.is_temporal()) {
            bail!("kinds {:?}: temporal questions need at least 2 events per video", self.kinds);
        }
        if self.caption_every == 0 {
            bail!("caption_every: must be at least 1");
        }
        Ok(())
    }

    /// Video duration in seconds (`frames / fps`).
    pub fn duration(&self) -> f64 {
        self.frames as f64 / self.fps
    }

    /// The timestamp of frame `i` in seconds.
    pub fn frame_time(&self, i: usize) -> f64 {
        i as f64 / self.fps
    }

    /// Number of videos in (train, val, test).
    pub fn split_sizes(&self) -> [usize; 3] {
        let n = self.videos;
        let val = ((n as f64 * self.val_fraction).round() as usize).min(n);
        let test = ((n as f64 * self.test_fraction).round() as usize).min(n - val);
        [n - val - test, val, test]
    }
}

/// The colours of events (never used by distractors or the background).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Color {
    pub const ALL: [Color; 6] = [Color::Red, Color::Green, Color::Blue, Color::Yellow, Color::Purple, Color::Orange];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    /// The colour's RGB value (saturated: max − min channel ≥ 150).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 30, 30],
            Color::Green => [30, 180, 50],
            Color::Blue => [30, 70, 230],
            Color::Yellow => [245, 215, 20],
            Color::Purple => [150, 40, 200],
            Color::Orange => [250, 130, 10],
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// The shapes of events (distractors are circles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Square,
    Triangle,
    Cross,
    Diamond,
    Star,
    Heart,
}

impl Shape {
    pub const ALL: [Shape; 6] = [
        Shape::Square,
        Shape::Triangle,
        Shape::Cross,
        Shape::Diamond,
        Shape::Star,
        Shape::Heart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
            Shape::Diamond => "diamond",
            Shape::Star => "star",
            Shape::Heart => "heart",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// Where in the frame an event appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
    Middle,
}

impl Location {
    pub const ALL: [Location; 5] = [
        Location::TopLeft,
        Location::TopRight,
        Location::BottomLeft,
        Location::BottomRight,
        Location::Middle,
    ];

    /// The answer text: "top left", ..., "middle".
    pub fn name(self) -> &'static str {
        match self {
            Location::TopLeft => "top left",
            Location::TopRight => "top right",
            Location::BottomLeft => "bottom left",
            Location::BottomRight => "bottom right",
            Location::Middle => "middle",
        }
    }

    /// The phrase in statements: "at the top left", "in the middle".
    pub fn phrase(self) -> String {
        match self {
            Location::Middle => "in the middle".to_string(),
            l => format!("at the {}", l.name()),
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The place's centre as a fraction of the frame size (x, y).
    pub fn anchor(self) -> (f64, f64) {
        match self {
            Location::TopLeft => (0.25, 0.25),
            Location::TopRight => (0.75, 0.25),
            Location::BottomLeft => (0.25, 0.75),
            Location::BottomRight => (0.75, 0.75),
            Location::Middle => (0.5, 0.5),
        }
    }
}

/// One event: a coloured shape visible in frames `start..=end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub shape: Shape,
    pub color: Color,
    pub location: Location,
    /// First frame showing the event.
    pub start: usize,
    /// Last frame showing the event (inclusive).
    pub end: usize,
    /// The shape's centre (pixels) in the first and the last frame; linear in between.
    pub from: [f64; 2],
    pub to: [f64; 2],
    /// Side of the shape's bounding box in pixels.
    pub size: u32,
    /// The span in seconds: timestamps of the first and last frame (`start / fps`, `end / fps`).
    pub span: [f64; 2],
}

impl Event {
    /// "red square".
    pub fn name(&self) -> String {
        format!("{} {}", self.color.name(), self.shape.name())
    }

    /// "a red square".
    pub fn a_name(&self) -> String {
        format!("a {}", self.name())
    }

    pub fn contains_frame(&self, i: usize) -> bool {
        self.start <= i && i <= self.end
    }

    /// The shape's centre in frame `i` (only meaningful while the event is visible).
    pub fn center_at(&self, i: usize) -> [f64; 2] {
        let n = self.end - self.start;
        let t = if n == 0 {
            0.0
        } else {
            (i.clamp(self.start, self.end) - self.start) as f64 / n as f64
        };
        [
            self.from[0] + t * (self.to[0] - self.from[0]),
            self.from[1] + t * (self.to[1] - self.from[1]),
        ]
    }
}

/// A grey circle bouncing off the frame's borders for the whole video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distractor {
    /// Centre in frame 0 (pixels).
    pub pos: [f64; 2],
    /// Pixels per frame.
    pub vel: [f64; 2],
    pub radius: f64,
    /// Muted grey (channels within 24 of each other).
    pub rgb: [u8; 3],
}

/// The kinds of questions (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionKind {
    Color,
    Shape,
    Location,
    After,
    Before,
}

impl QuestionKind {
    pub const ALL: [QuestionKind; 5] = [
        QuestionKind::Color,
        QuestionKind::Shape,
        QuestionKind::Location,
        QuestionKind::After,
        QuestionKind::Before,
    ];

    /// The NExT-QA type code.
    pub fn qtype(self) -> &'static str {
        match self {
            QuestionKind::Color | QuestionKind::Shape => "DO",
            QuestionKind::Location => "DL",
            QuestionKind::After => "TN",
            QuestionKind::Before => "TP",
        }
    }

    pub fn is_temporal(self) -> bool {
        matches!(self, QuestionKind::After | QuestionKind::Before)
    }

    pub fn name(self) -> &'static str {
        match self {
            QuestionKind::Color => "color",
            QuestionKind::Shape => "shape",
            QuestionKind::Location => "location",
            QuestionKind::After => "after",
            QuestionKind::Before => "before",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl std::str::FromStr for QuestionKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        Self::from_name(s).ok_or_else(|| anyhow::anyhow!("unknown question kind `{s}` (expected color, shape, location, after, before)"))
    }
}

impl std::fmt::Display for QuestionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One multiple-choice question about a video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthQuestion {
    /// Question id within the video (0, 1, ...).
    pub qid: usize,
    pub kind: QuestionKind,
    /// NExT-QA type code (DO, DL, TN, TP).
    pub qtype: String,
    /// The question, lower case, without a question mark (as NExT-QA writes them).
    pub question: String,
    pub options: Vec<String>,
    /// Index of the correct option.
    pub answer: usize,
    /// The event the answer describes (index into the video's events); its span is the evidence.
    pub answer_event: usize,
    /// For temporal questions: the event the question names.
    pub reference_event: Option<usize>,
    /// The evidence in seconds (the answer event's span).
    pub span: [f64; 2],
    /// The declarative form of question + answer (see [`statement`]).
    pub statement: String,
}

impl SynthQuestion {
    pub fn answer_text(&self) -> &str {
        &self.options[self.answer]
    }
}

/// Which split a video belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// One synthetic video: its events, distractors and questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthVideo {
    /// Video id (`v00000`, ...).
    pub id: String,
    pub split: Split,
    /// In temporal order.
    pub events: Vec<Event>,
    pub distractors: Vec<Distractor>,
    pub questions: Vec<SynthQuestion>,
}

impl SynthVideo {
    /// The event visible in frame `i`, if any.
    pub fn event_at(&self, i: usize) -> Option<usize> {
        self.events.iter().position(|e| e.contains_frame(i))
    }
}

/// A generated world: the config and every video's content (rendering is a pure function of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct World {
    pub config: SynthConfig,
    pub videos: Vec<SynthVideo>,
}

impl World {
    /// Draw all videos from the config's seed (sequentially: each video gets its own forked
    /// generator, so rendering can run in parallel without changing anything).
    pub fn generate(cfg: &SynthConfig) -> Result<World> {
        cfg.validate()?;
        let mut master = SeededRng::new(cfg.seed);
        let [n_train, n_val, _] = cfg.split_sizes();
        let mut videos = Vec::with_capacity(cfg.videos);
        for i in 0..cfg.videos {
            let mut rng = master.fork(i as u64);
            let split = if i < n_train {
                Split::Train
            } else if i < n_train + n_val {
                Split::Val
            } else {
                Split::Test
            };
            videos.push(generate_video(cfg, format!("v{i:05}"), split, &mut rng));
        }
        Ok(World {
            config: cfg.clone(),
            videos,
        })
    }

    pub fn videos_in(&self, split: Split) -> impl Iterator<Item = &SynthVideo> {
        self.videos.iter().filter(move |v| v.split == split)
    }

    /// Number of questions in the world.
    pub fn num_questions(&self) -> usize {
        self.videos.iter().map(|v| v.questions.len()).sum()
    }
}

/// The share of questions whose answer event shows in at least one of `k` frames picked
/// uniformly (positions `round(linspace(0, t − 1, k))`, SPEC §6) among `t` frames sampled
/// uniformly (segment centres, [`crate::video::sample_indices`]) from each video: how often a
/// model without grounding sees the evidence at all.
pub fn uniform_hit_rate(world: &World, t: usize, k: usize) -> f64 {
    let cfg = &world.config;
    if t == 0 || k == 0 {
        return 0.0;
    }
    let sampled = crate::video::sample_indices(cfg.frames, t, crate::video::Sampling::Uniform);
    let picks: Vec<usize> = (0..k)
        .map(|j| {
            let pos = if k == 1 { 0.0 } else { j as f64 * (t - 1) as f64 / (k - 1) as f64 };
            sampled[(pos.round() as usize).min(t.saturating_sub(1))]
        })
        .collect();
    let (mut hit, mut total) = (0usize, 0usize);
    for v in &world.videos {
        for q in &v.questions {
            total += 1;
            hit += picks.iter().any(|&f| v.events[q.answer_event].contains_frame(f)) as usize;
        }
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

fn uniform_in(rng: &mut SeededRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

/// `k` distinct elements of `xs` in random order.
fn choose<T: Copy>(rng: &mut SeededRng, xs: &[T], k: usize) -> Vec<T> {
    let mut v = xs.to_vec();
    rng.shuffle(&mut v);
    v.truncate(k);
    v
}

fn generate_video(cfg: &SynthConfig, id: String, split: Split, rng: &mut SeededRng) -> SynthVideo {
    let (w, h) = (cfg.width as f64, cfg.height as f64);
    // Distractors.
    let mut distractors = Vec::with_capacity(cfg.distractors);
    for _ in 0..cfg.distractors {
        let radius = uniform_in(rng, cfg.distractor_radius[0], cfg.distractor_radius[1]);
        let pos = [uniform_in(rng, radius, w - radius), uniform_in(rng, radius, h - radius)];
        let speed = uniform_in(rng, cfg.distractor_speed[0], cfg.distractor_speed[1]);
        let angle = uniform_in(rng, 0.0, 2.0 * std::f64::consts::PI);
        let grey = 85 + rng.below(76) as i32; // 85..=160
        let mut rgb = [0u8; 3];
        for c in rgb.iter_mut() {
            *c = (grey + rng.below(17) as i32 - 8).clamp(0, 255) as u8;
        }
        distractors.push(Distractor {
            pos,
            vel: [speed * angle.cos(), speed * angle.sin()],
            radius,
            rgb,
        });
    }

    // Event timing: lengths, then the free frames split uniformly (stars and bars) into
    // n + 1 gaps, each inner gap at least `event_gap`.
    let n = cfg.events;
    let lens: Vec<usize> = (0..n)
        .map(|_| cfg.event_frames[0] + rng.below(cfg.event_frames[1] - cfg.event_frames[0] + 1))
        .collect();
    let free = cfg.frames - lens.iter().sum::<usize>() - (n - 1) * cfg.event_gap;
    // n cut points in 0..=free, sorted: gaps are the differences.
    let mut cuts: Vec<usize> = (0..n).map(|_| rng.below(free + 1)).collect();
    cuts.sort_unstable();
    let shapes = choose(rng, &Shape::ALL, n);
    let colors = choose(rng, &Color::ALL, n);
    let mut events = Vec::with_capacity(n);
    let mut used_before = 0usize; // frames taken by earlier events and their gaps
    let size = cfg.event_size as f64;
    for k in 0..n {
        let start = cuts[k] + used_before;
        let end = start + lens[k] - 1;
        used_before += lens[k] + cfg.event_gap;
        let location = Location::ALL[rng.below(Location::ALL.len())];
        let (ax, ay) = location.anchor();
        // The shape stays within `jitter` of the place's centre, so it stays inside its quadrant
        // (or the middle) for the whole event.
        let jitter_x = (w / 4.0 - size / 2.0 - 1.0).max(0.0);
        let jitter_y = (h / 4.0 - size / 2.0 - 1.0).max(0.0);
        let (cx, cy) = (ax * w, ay * h);
        let from = [cx + uniform_in(rng, -jitter_x, jitter_x), cy + uniform_in(rng, -jitter_y, jitter_y)];
        let angle = uniform_in(rng, 0.0, 2.0 * std::f64::consts::PI);
        let dist = uniform_in(rng, 0.0, cfg.event_motion);
        let to = [
            (from[0] + dist * angle.cos()).clamp(cx - jitter_x, cx + jitter_x),
            (from[1] + dist * angle.sin()).clamp(cy - jitter_y, cy + jitter_y),
        ];
        events.push(Event {
            shape: shapes[k],
            color: colors[k],
            location,
            start,
            end,
            from,
            to,
            size: cfg.event_size,
            span: [cfg.frame_time(start), cfg.frame_time(end)],
        });
    }

    let questions = generate_questions(cfg, &events, rng);
    SynthVideo {
        id,
        split,
        events,
        distractors,
        questions,
    }
}

/// A question before its options are drawn.
#[derive(Debug, Clone, Copy)]
struct QuestionPlan {
    kind: QuestionKind,
    answer_event: usize,
    reference_event: Option<usize>,
}

fn question_text(kind: QuestionKind, answer: &Event, reference: Option<&Event>) -> String {
    match (kind, reference) {
        (QuestionKind::Color, _) => format!("what color was the {} that appeared", answer.shape.name()),
        (QuestionKind::Shape, _) => format!("what shape was the {} thing that appeared", answer.color.name()),
        (QuestionKind::Location, _) => format!("where did the {} appear", answer.name()),
        (QuestionKind::After, Some(r)) => format!("what appeared after the {}", r.name()),
        (QuestionKind::Before, Some(r)) => format!("what appeared before the {}", r.name()),
        // Temporal plans always carry a reference (see `generate_questions`).
        (QuestionKind::After | QuestionKind::Before, None) => format!("what appeared around the {}", answer.name()),
    }
}

fn generate_questions(cfg: &SynthConfig, events: &[Event], rng: &mut SeededRng) -> Vec<SynthQuestion> {
    // Every question the video allows, in a fixed order; then a random subset.
    let mut pool = Vec::new();
    for kind in QuestionKind::ALL {
        if !cfg.kinds.contains(&kind) {
            continue;
        }
        for e in 0..events.len() {
            let plan = match kind {
                QuestionKind::Color | QuestionKind::Shape | QuestionKind::Location => Some(QuestionPlan {
                    kind,
                    answer_event: e,
                    reference_event: None,
                }),
                // "what appeared after <e-1>" → e
                QuestionKind::After => (e > 0).then(|| QuestionPlan {
                    kind,
                    answer_event: e,
                    reference_event: Some(e - 1),
                }),
                // "what appeared before <e+1>" → e
                QuestionKind::Before => (e + 1 < events.len()).then(|| QuestionPlan {
                    kind,
                    answer_event: e,
                    reference_event: Some(e + 1),
                }),
            };
            pool.extend(plan);
        }
    }
    rng.shuffle(&mut pool);
    pool.truncate(cfg.questions_per_video);
    pool.into_iter()
        .enumerate()
        .map(|(qid, plan)| make_question(qid, plan, events, rng))
        .collect()
}

fn make_question(qid: usize, plan: QuestionPlan, events: &[Event], rng: &mut SeededRng) -> SynthQuestion {
    let ev = &events[plan.answer_event];
    let reference = plan.reference_event.map(|r| &events[r]);
    let (answer, wrong): (String, Vec<String>) = match plan.kind {
        QuestionKind::Color => {
            let others: Vec<Color> = Color::ALL.into_iter().filter(|&c| c != ev.color).collect();
            (
                ev.color.name().into(),
                choose(rng, &others, 4).iter().map(|c| c.name().into()).collect(),
            )
        }
        QuestionKind::Shape => {
            let others: Vec<Shape> = Shape::ALL.into_iter().filter(|&s| s != ev.shape).collect();
            (
                ev.shape.name().into(),
                choose(rng, &others, 4).iter().map(|s| s.name().into()).collect(),
            )
        }
        QuestionKind::Location => {
            let others: Vec<Location> = Location::ALL.into_iter().filter(|&l| l != ev.location).collect();
            (
                ev.location.name().into(),
                choose(rng, &others, 4).iter().map(|l| l.name().into()).collect(),
            )
        }
        QuestionKind::After | QuestionKind::Before => {
            // Other coloured shapes: two sharing the colour or the shape of the answer, two
            // others; never the answer or the event the question names.
            let excluded = |c: Color, s: Shape| (c == ev.color && s == ev.shape) || reference.is_some_and(|r| c == r.color && s == r.shape);
            let mut near = Vec::new();
            let mut far = Vec::new();
            for c in Color::ALL {
                for s in Shape::ALL {
                    if excluded(c, s) {
                        continue;
                    }
                    if c == ev.color || s == ev.shape {
                        near.push((c, s));
                    } else {
                        far.push((c, s));
                    }
                }
            }
            let mut picked = choose(rng, &near, 2);
            let rest: Vec<(Color, Shape)> = far.into_iter().chain(near.into_iter().filter(|p| !picked.contains(p))).collect();
            picked.extend(choose(rng, &rest, 4 - picked.len()));
            rng.shuffle(&mut picked);
            (
                ev.a_name(),
                picked.iter().map(|(c, s)| format!("a {} {}", c.name(), s.name())).collect(),
            )
        }
    };
    let answer_idx = rng.below(5);
    let mut options = Vec::with_capacity(5);
    let mut wrong_it = wrong.into_iter();
    for i in 0..5 {
        if i == answer_idx {
            options.push(answer.clone());
        } else {
            options.extend(wrong_it.next());
        }
    }
    let question = question_text(plan.kind, ev, reference);
    let statement = statement(&question, &answer).unwrap_or_else(|| format!("{question} {answer}"));
    SynthQuestion {
        qid,
        kind: plan.kind,
        qtype: plan.kind.qtype().to_string(),
        question,
        options,
        answer: answer_idx,
        answer_event: plan.answer_event,
        reference_event: plan.reference_event,
        span: ev.span,
        statement,
    }
}

/// The declarative sentence of a synthetic question and its answer text, e.g.
/// ("what color was the square that appeared", "red") → "the square that appeared was red";
/// ("what appeared after the red square", "a green cross") → "a green cross appeared after the red
/// square". None when the question is not one of the synthetic templates. A trailing `?` is
/// ignored.
pub fn statement(question: &str, answer: &str) -> Option<String> {
    let q = question.trim().trim_end_matches('?').trim_end();
    let a = answer.trim();
    if a.is_empty() {
        return None;
    }
    if let Some(shape) = q.strip_prefix("what color was the ").and_then(|r| r.strip_suffix(" that appeared")) {
        return Some(format!("the {shape} that appeared was {a}"));
    }
    if let Some(color) = q
        .strip_prefix("what shape was the ")
        .and_then(|r| r.strip_suffix(" thing that appeared"))
    {
        return Some(format!("the {color} thing that appeared was a {a}"));
    }
    if let Some(thing) = q.strip_prefix("where did the ").and_then(|r| r.strip_suffix(" appear")) {
        let place = Location::from_name(a)?;
        return Some(format!("the {thing} appeared {}", place.phrase()));
    }
    if let Some(thing) = q.strip_prefix("what appeared after the ") {
        return Some(format!("{a} appeared after the {thing}"));
    }
    if let Some(thing) = q.strip_prefix("what appeared before the ") {
        return Some(format!("{a} appeared before the {thing}"));
    }
    None
}

/// Question and answer as one text: `"{question}? {answer}"`.
pub fn question_answer_text(question: &str, answer: &str) -> String {
    format!("{}? {}", question.trim().trim_end_matches('?').trim_end(), answer.trim())
}

/// True captions of frame `i` of a video. A frame that shows an event gets, for that event, the
/// answer texts of every question it can answer ("red", "square", "top left", "a red square"),
/// the question+answer texts ([`question_answer_text`]) and statements ([`statement`]) of those
/// questions — including the temporal ones relating it to its neighbouring events — and a few
/// plain descriptions ("a red square appeared", "a red square at the top left"). A frame without
/// an event gets descriptions of what is there ("grey circles moving", "nothing appeared", ...).
/// Sorted, without duplicates.
pub fn frame_captions(video: &SynthVideo, i: usize) -> Vec<String> {
    let mut caps: Vec<String> = Vec::new();
    let n_dis = video.distractors.len();
    match video.event_at(i) {
        Some(k) => {
            let e = &video.events[k];
            let (c, s, l) = (e.color.name(), e.shape.name(), e.location);
            caps.push(c.to_string());
            caps.push(s.to_string());
            caps.push(l.name().to_string());
            caps.push(e.name());
            caps.push(e.a_name());
            caps.push(format!("{} appeared", e.a_name()));
            caps.push(format!("{} {}", e.a_name(), l.phrase()));
            if n_dis > 0 {
                caps.push(format!("{} and grey circles", e.a_name()));
            }
            let mut qa = |q: String, a: String| {
                caps.push(question_answer_text(&q, &a));
                if let Some(st) = statement(&q, &a) {
                    caps.push(st);
                }
            };
            for kind in [QuestionKind::Color, QuestionKind::Shape, QuestionKind::Location] {
                let a = match kind {
                    QuestionKind::Color => c.to_string(),
                    QuestionKind::Shape => s.to_string(),
                    _ => l.name().to_string(),
                };
                qa(question_text(kind, e, None), a);
            }
            if k > 0 {
                qa(question_text(QuestionKind::After, e, Some(&video.events[k - 1])), e.a_name());
            }
            if k + 1 < video.events.len() {
                qa(question_text(QuestionKind::Before, e, Some(&video.events[k + 1])), e.a_name());
            }
        }
        None => {
            caps.push("nothing appeared".to_string());
            if n_dis == 0 {
                caps.push("an empty background".to_string());
            } else {
                caps.push("grey circles moving".to_string());
                caps.push("only grey circles".to_string());
                caps.push(if n_dis == 1 {
                    "a grey circle".to_string()
                } else {
                    format!("{} grey circles", number_word(n_dis))
                });
            }
        }
    }
    caps.sort();
    caps.dedup();
    caps
}

fn number_word(n: usize) -> String {
    const WORDS: [&str; 11] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    WORDS.get(n).map(|s| s.to_string()).unwrap_or_else(|| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_follow_the_templates() {
        assert_eq!(
            statement("what color was the square that appeared", "red").as_deref(),
            Some("the square that appeared was red")
        );
        assert_eq!(
            statement("what shape was the red thing that appeared?", "square").as_deref(),
            Some("the red thing that appeared was a square")
        );
        assert_eq!(
            statement("where did the red square appear", "middle").as_deref(),
            Some("the red square appeared in the middle")
        );
        assert_eq!(
            statement("where did the red square appear", "top left").as_deref(),
            Some("the red square appeared at the top left")
        );
        assert_eq!(
            statement("what appeared after the red square", "a green cross").as_deref(),
            Some("a green cross appeared after the red square")
        );
        assert_eq!(
            statement("what appeared before the green cross", "a red square").as_deref(),
            Some("a red square appeared before the green cross")
        );
        assert_eq!(statement("why did the boy smile", "happy"), None);
        assert_eq!(question_answer_text("what shape was it?", "star"), "what shape was it? star");
    }

    #[test]
    fn split_sizes_add_up() {
        for n in [1, 2, 3, 7, 10, 200] {
            let cfg = SynthConfig {
                videos: n,
                ..Default::default()
            };
            let s = cfg.split_sizes();
            assert_eq!(s.iter().sum::<usize>(), n, "{n}: {s:?}");
        }
        let cfg = SynthConfig {
            videos: 20,
            ..Default::default()
        };
        assert_eq!(cfg.split_sizes(), [14, 3, 3]);
    }

    #[test]
    fn bad_configs_are_rejected_with_the_field_named() {
        let bad = |f: fn(&mut SynthConfig), field: &str| {
            let mut c = SynthConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        };
        bad(|c| c.frames = 10, "frames");
        bad(|c| c.event_size = 40, "event_size");
        bad(|c| c.event_frames = [5, 3], "event_frames");
        bad(|c| c.events = 7, "events");
        bad(|c| c.fps = 0.0, "fps");
        bad(|c| c.background = [255, 0, 0], "background");
        SynthConfig::default().validate().unwrap();
    }
}
