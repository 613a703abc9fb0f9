//! The synthetic grounded VideoQA world (`gcg::synth`): determinism, the published formats
//! (read back with the NExT-QA / NExT-GQA readers), and the property the world exists for — the
//! answer is visible only inside its grounding span — checked on the written pixels (JPEG frames
//! and the decoded mp4s, needs the `ffmpeg` tool; fails without it), plus how often uniform frame
//! selection misses the evidence.
//!
//! Colours are recognised here by hue ranges written for this test, not with the generator's
//! colour table.

use gcg::data::nextgqa::Grounding;
use gcg::data::nextqa::{self, VideoPaths};
use gcg::data::{Answer, QaSample};
use gcg::synth::{self, Mp4Mode, QuestionKind, SynthConfig, World, WriteOptions, WriteSummary};
use gcg::video::{self, Ffmpeg, Sampling};
use image::RgbImage;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// 10 videos (6 train, 2 val, 2 test), all 8 questions each video allows (so every event is the
/// answer event of some question).
fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        videos: 10,
        val_fraction: 0.2,
        test_fraction: 0.2,
        questions_per_video: 8,
        ..SynthConfig::default()
    }
}

fn write(cfg: &SynthConfig, out: &Path, mp4: Mp4Mode, threads: usize) -> WriteSummary {
    let world = World::generate(cfg).unwrap();
    let opts = WriteOptions {
        mp4,
        threads,
        ..WriteOptions::default()
    };
    synth::write_world(&world, out, &opts, &|_| {}).unwrap()
}

/// Every file under `dir` (relative path → bytes).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The strongly coloured pixels of a frame (max − min channel ≥ 90): count, mean colour,
/// centroid (pixel centres).
struct Saturated {
    count: usize,
    mean: [f64; 3],
    centroid: [f64; 2],
}

fn saturated(img: &RgbImage) -> Saturated {
    let (mut n, mut sum, mut cx, mut cy) = (0usize, [0f64; 3], 0f64, 0f64);
    for (x, y, p) in img.enumerate_pixels() {
        let [r, g, b] = p.0;
        let (mx, mn) = (r.max(g).max(b), r.min(g).min(b));
        if mx - mn >= 90 {
            n += 1;
            for (s, v) in sum.iter_mut().zip(p.0) {
                *s += v as f64;
            }
            cx += x as f64 + 0.5;
            cy += y as f64 + 0.5;
        }
    }
    let d = n.max(1) as f64;
    Saturated {
        count: n,
        mean: sum.map(|s| s / d),
        centroid: [cx / d, cy / d],
    }
}

/// The colour word of a saturated colour, from its hue.
fn hue_name(rgb: [f64; 3]) -> &'static str {
    let [r, g, b] = rgb.map(|c| c / 255.0);
    let (mx, mn) = (r.max(g).max(b), r.min(g).min(b));
    let d = mx - mn;
    let h = if mx == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if mx == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    match h {
        h if !(12.0..=335.0).contains(&h) => "red",
        h if h < 40.0 => "orange",
        h if h < 75.0 => "yellow",
        h if (90.0..170.0).contains(&h) => "green",
        h if (200.0..255.0).contains(&h) => "blue",
        h if (260.0..325.0).contains(&h) => "purple",
        _ => "unclear",
    }
}

/// The place word of a shape centre in a `w`×`h` frame: nearest of the five places.
fn place_name(c: [f64; 2], w: f64, h: f64) -> &'static str {
    let places = [
        ("top left", 0.25, 0.25),
        ("top right", 0.75, 0.25),
        ("bottom left", 0.25, 0.75),
        ("bottom right", 0.75, 0.75),
        ("middle", 0.5, 0.5),
    ];
    let d = |&(_, x, y): &(&str, f64, f64)| (c[0] - x * w).powi(2) + (c[1] - y * h).powi(2);
    places.iter().min_by(|a, b| d(a).total_cmp(&d(b))).unwrap().0
}

fn read_split(dir: &Path, split: &str) -> (Vec<QaSample>, Grounding) {
    let samples = nextqa::read(&dir.join(format!("{split}.csv"))).unwrap();
    let gsub = Grounding::read(&dir.join(format!("gsub_{split}.json"))).unwrap();
    (samples, gsub)
}

fn choice(s: &QaSample) -> usize {
    match s.answer {
        Answer::Choice(i) => i,
        Answer::Text(_) => panic!("{}: NExT-QA answers are indices", s.key),
    }
}

#[test]
fn same_seed_gives_byte_identical_files_whatever_the_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig { videos: 4, ..small(5) };
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let s = write(&cfg, &a, Mp4Mode::Always, 1);
    assert!(s.mp4);
    write(&cfg, &b, Mp4Mode::Always, 3);
    let (ta, tb) = (tree(&a), tree(&b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (k, v) in &ta {
        assert!(v == &tb[k], "{} differs between two runs with the same seed", k.display());
    }
    // 4 videos × (64 frames + frames.json + mp4) + 3 csv + 3 gsub + map + world + captions.
    assert_eq!(
        ta.len(),
        4 * 66 + 9,
        "{:?}",
        ta.keys().filter(|k| !k.starts_with("frames")).collect::<Vec<_>>()
    );
    // Another seed: another world.
    let c = tmp.path().join("c");
    write(&SynthConfig { seed: 6, ..cfg.clone() }, &c, Mp4Mode::Never, 2);
    let tc = tree(&c);
    assert_ne!(ta[Path::new("train.csv")], tc[Path::new("train.csv")]);
    assert_ne!(
        ta[Path::new("frames/v00000/frame_10.jpg")],
        tc[Path::new("frames/v00000/frame_10.jpg")]
    );
    assert!(!tc.keys().any(|k| k.starts_with("videos")), "Mp4Mode::Never wrote videos");
}

#[test]
fn annotations_load_with_the_nextqa_and_nextgqa_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let cfg = small(1);
    let summary = write(&cfg, &dir, Mp4Mode::Never, 2);
    let mut all_videos = Vec::new();
    for (split, n_videos) in [("train", 6), ("val", 2), ("test", 2)] {
        let (samples, gsub) = read_split(&dir, split);
        assert_eq!(samples.len(), n_videos * 8, "{split}");
        assert_eq!(summary.questions[split], n_videos * 8);
        assert_eq!(gsub.videos.len(), n_videos, "{split}");
        assert_eq!(gsub.num_questions(), samples.len(), "{split}");
        for v in &gsub.videos {
            assert_eq!(v.duration, 8.0);
            assert_eq!(v.fps, 8.0);
        }
        for s in &samples {
            assert_eq!(s.options.len(), 5);
            assert!(choice(s) < 5);
            assert_eq!(s.extra["frame_count"], "64");
            assert_eq!(s.extra["width"], "64");
            assert_eq!(s.extra["height"], "64");
            let want_type = if s.question.starts_with("where") {
                "DL"
            } else if s.question.starts_with("what appeared after") {
                "TN"
            } else if s.question.starts_with("what appeared before") {
                "TP"
            } else {
                "DO"
            };
            assert_eq!(s.qtype, want_type, "{}", s.question);
            let segs = gsub
                .segments(&s.video, &s.qid)
                .unwrap_or_else(|| panic!("{} has no gsub entry", s.key));
            assert_eq!(segs.len(), 1);
            let [a, b] = segs[0];
            assert!(0.0 <= a && a < b && b < 8.0, "{}: {a}..{b}", s.key);
            // Events last 6–8 frames: first and last frame timestamps 5–7 frames apart.
            let frames = ((b - a) * 8.0).round() as usize;
            assert!((5..=7).contains(&frames), "{}: span {a}..{b}", s.key);
        }
        let mut vids: Vec<String> = samples.iter().map(|s| s.video.clone()).collect();
        vids.dedup();
        assert_eq!(vids.len(), n_videos);
        all_videos.extend(vids);
    }
    let map = VideoPaths::read(&dir.join("map_vid_vidorID.json")).unwrap();
    assert_eq!(map.len(), 10);
    for v in &all_videos {
        assert_eq!(
            map.video_file(&dir.join("videos"), v).unwrap(),
            dir.join("videos").join(format!("{v}.mp4"))
        );
        let frames = video::read_frame_dir(&dir.join("frames").join(v), 64, Sampling::Uniform, true).unwrap();
        assert_eq!(frames.num_source_frames, 64);
        assert_eq!(frames.duration, Some(8.0));
        assert_eq!(frames.timestamps().unwrap(), (0..64).map(|i| i as f64 / 8.0).collect::<Vec<_>>());
    }
    // world.json round-trips into the same world.
    let world: World = serde_json::from_slice(&std::fs::read(dir.join("world.json")).unwrap()).unwrap();
    assert_eq!(world, World::generate(&cfg).unwrap());
}

#[test]
fn options_hold_the_answer_once_and_answer_positions_are_uniform() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    write(&small(2), &dir, Mp4Mode::Never, 2);
    for split in ["train", "val", "test"] {
        for s in read_split(&dir, split).0 {
            let answer = s.answer_text().to_string();
            assert_eq!(s.options.iter().filter(|o| **o == answer).count(), 1, "{}: {:?}", s.key, s.options);
            let mut distinct = s.options.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 5, "{}: {:?}", s.key, s.options);
            // Wrong options are of the answer's kind.
            let words = |o: &str| o.split(' ').count();
            assert!(
                s.options.iter().all(|o| words(o) == words(&answer) || s.qtype == "DL"),
                "{:?}",
                s.options
            );
        }
    }
    // Position of the answer over 1000 questions: each index 200 ± 50 (4 sd), χ² (4 dof) < 18.5
    // (p = 0.001).
    let world = World::generate(&SynthConfig {
        videos: 250,
        ..SynthConfig::default()
    })
    .unwrap();
    let mut counts = [0usize; 5];
    for q in world.videos.iter().flat_map(|v| &v.questions) {
        counts[q.answer] += 1;
    }
    let n: usize = counts.iter().sum();
    assert_eq!(n, 1000);
    let chi2: f64 = counts.iter().map(|&c| (c as f64 - 200.0).powi(2) / 200.0).sum();
    eprintln!("answer positions {counts:?}, chi2 {chi2:.2}");
    assert!(counts.iter().all(|&c| (150..=250).contains(&c)), "{counts:?}");
    assert!(chi2 < 18.5, "{counts:?}: chi2 {chi2}");
}

/// Check a decoded/read video (frames + their timestamps) against the questions and spans read
/// from the files: the answer's colour (and place) shows in every frame of its span, nothing
/// saturated shows outside all spans, temporal references are on the right side.
fn check_visible_only_in_spans(label: &str, frames: &[(RgbImage, f64)], questions: &[&QaSample], gsub: &Grounding, min_pixels: usize) {
    let video = &questions[0].video;
    let spans: Vec<[f64; 2]> = questions.iter().map(|q| gsub.segments(video, &q.qid).unwrap()[0]).collect();
    let info: Vec<Saturated> = frames.iter().map(|(img, _)| saturated(img)).collect();
    let inside = |t: f64| spans.iter().any(|s| s[0] <= t && t <= s[1]);
    for ((img, t), s) in frames.iter().zip(&info) {
        if inside(*t) {
            assert!(
                s.count >= min_pixels,
                "{label} {video} t={t}: only {} coloured pixels inside an event",
                s.count
            );
            assert_ne!(hue_name(s.mean), "unclear", "{label} {video} t={t}: {:?}", s.mean);
        } else {
            assert_eq!(s.count, 0, "{label} {video} t={t}: coloured pixels outside every event");
        }
        assert_eq!(img.dimensions(), (64, 64));
    }
    // The colour seen during a span, and where.
    let colour_in = |span: [f64; 2]| -> Vec<&'static str> {
        frames
            .iter()
            .zip(&info)
            .filter(|((_, t), _)| span[0] <= *t && *t <= span[1])
            .map(|(_, s)| hue_name(s.mean))
            .collect()
    };
    let times_of = |colour: &str| -> Vec<f64> {
        frames
            .iter()
            .zip(&info)
            .filter(|(_, s)| s.count > 0 && hue_name(s.mean) == colour)
            .map(|((_, t), _)| *t)
            .collect()
    };
    for (q, &span) in questions.iter().zip(&spans) {
        let seen = colour_in(span);
        assert!(!seen.is_empty(), "{label} {}: no frame in span {span:?}", q.key);
        let answer = q.answer_text();
        // The colour the answer event must have.
        let colour = if q.question.starts_with("what color") {
            answer.to_string()
        } else if q.question.starts_with("what shape was the ") || q.question.starts_with("where did the ") {
            // "what shape was the red thing that appeared", "where did the red square appear"
            q.question.split("the ").nth(1).unwrap().split(' ').next().unwrap().to_string()
        } else {
            answer.split(' ').nth(1).unwrap().to_string() // "a green cross"
        };
        assert!(
            seen.iter().all(|c| *c == colour),
            "{label} {}: `{}` → `{answer}`, but the span shows {seen:?}",
            q.key,
            q.question
        );
        if q.question.starts_with("where") {
            for ((_, t), s) in frames.iter().zip(&info) {
                if span[0] <= *t && *t <= span[1] {
                    assert_eq!(place_name(s.centroid, 64.0, 64.0), answer, "{label} {} t={t}", q.key);
                }
            }
        }
        if let Some(reference) = q.question.strip_prefix("what appeared ") {
            // "after the red square" / "before the green cross"
            let ref_colour = reference.split(' ').nth(2).unwrap();
            let ref_times = times_of(ref_colour);
            assert!(!ref_times.is_empty(), "{label} {}: the {ref_colour} thing never shows", q.key);
            // Nothing else shows between the reference and the answer.
            let (lo, hi) = if reference.starts_with("after") {
                let last = ref_times.iter().cloned().fold(f64::MIN, f64::max);
                assert!(
                    last < span[0],
                    "{label} {}: reference at {ref_times:?}, answer span {span:?}",
                    q.key
                );
                (last, span[0])
            } else {
                let first = ref_times.iter().cloned().fold(f64::MAX, f64::min);
                assert!(
                    first > span[1],
                    "{label} {}: reference at {ref_times:?}, answer span {span:?}",
                    q.key
                );
                (span[1], first)
            };
            for ((_, t), s) in frames.iter().zip(&info) {
                if lo < *t && *t < hi {
                    assert_eq!(s.count, 0, "{label} {}: another event between reference and answer at {t}", q.key);
                }
            }
        }
    }
}

#[test]
fn answers_are_visible_only_inside_their_spans_in_the_jpeg_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    write(&small(3), &dir, Mp4Mode::Never, 2);
    let mut checked = 0;
    for split in ["train", "val", "test"] {
        let (samples, gsub) = read_split(&dir, split);
        let mut by_video: HashMap<&str, Vec<&QaSample>> = HashMap::new();
        for s in &samples {
            by_video.entry(&s.video).or_default().push(s);
        }
        for (v, qs) in by_video {
            let sampled = video::read_frame_dir(&dir.join("frames").join(v), 64, Sampling::Uniform, true).unwrap();
            let frames: Vec<(RgbImage, f64)> = sampled
                .frames
                .into_iter()
                .map(|f| (std::sync::Arc::unwrap_or_clone(f.image), f.timestamp.unwrap()))
                .collect();
            // Events are at least 20·20·0.36 pixels large.
            check_visible_only_in_spans("jpeg", &frames, &qs, &gsub, 100);
            checked += qs.len();
        }
    }
    assert_eq!(checked, 80);
}

#[test]
fn mp4_decodes_to_every_frame_with_the_same_content() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let cfg = SynthConfig {
        videos: 3,
        val_fraction: 0.0,
        test_fraction: 0.0,
        ..small(4)
    };
    let s = write(&cfg, &dir, Mp4Mode::Always, 2);
    assert!(s.mp4 && s.mp4_skipped.is_none());
    let (samples, gsub) = read_split(&dir, "train");
    let ff = Ffmpeg::from_env();
    for v in ["v00000", "v00001", "v00002"] {
        let path = dir.join("videos").join(format!("{v}.mp4"));
        let info = ff.probe(&path).unwrap();
        assert_eq!((info.width, info.height, info.num_frames), (64, 64, 64), "{info:?}");
        assert_eq!(info.codec, "h264");
        assert!(
            (info.fps.unwrap() - 8.0).abs() < 1e-9 && (info.duration.unwrap() - 8.0).abs() < 1e-3,
            "{info:?}"
        );
        let got = ff.sample(&path, 64, Sampling::Uniform).unwrap();
        assert_eq!(got.indices(), (0..64).collect::<Vec<_>>());
        assert_eq!(got.padded, 0);
        let frames: Vec<(RgbImage, f64)> = got
            .frames
            .into_iter()
            .map(|f| (std::sync::Arc::unwrap_or_clone(f.image), f.timestamp.unwrap()))
            .collect();
        for (i, (_, t)) in frames.iter().enumerate() {
            assert!((t - i as f64 / 8.0).abs() < 1e-3, "{v} frame {i} at {t}");
        }
        let qs: Vec<&QaSample> = samples.iter().filter(|s| s.video == v).collect();
        check_visible_only_in_spans("mp4", &frames, &qs, &gsub, 100);
    }
}

#[test]
fn uniform_selection_often_misses_the_event_and_the_oracle_never_does() {
    // The default world: 64 frames at 8 fps, events of 6–8 frames. The LMM samples T = 32
    // frames uniformly (segment centres: frames 1, 3, ..., 63) and keeps K = 4.
    let cfg = SynthConfig {
        videos: 300,
        seed: 11,
        ..SynthConfig::default()
    };
    let world = World::generate(&cfg).unwrap();
    let (t, k) = (32usize, 4usize);
    let sampled = video::sample_indices(64, t, Sampling::Uniform);
    assert_eq!(sampled, (0..32).map(|i| 2 * i + 1).collect::<Vec<_>>());
    // Uniform K of T: positions round(linspace(0, 31, 4)) = 0, 10, 21, 31 → frames 1, 21, 43, 63.
    let uniform: Vec<usize> = [0usize, 10, 21, 31].iter().map(|&p| sampled[p]).collect();
    let time = |i: usize| i as f64 / 8.0;
    let (mut hits, mut oracle_hits, mut total) = (0usize, 0usize, 0usize);
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for v in &world.videos {
        for q in &v.questions {
            let [a, b] = q.span;
            let in_span = |i: &usize| a <= time(*i) && time(*i) <= b;
            let hit = uniform.iter().any(in_span);
            // Oracle: the K sampled frames nearest to the span's centre.
            let mut by_dist = sampled.clone();
            by_dist.sort_by(|x, y| (time(*x) - (a + b) / 2.0).abs().total_cmp(&(time(*y) - (a + b) / 2.0).abs()));
            let oracle = by_dist[..k].iter().any(in_span);
            // Every event covers at least 3 of the 32 sampled frames.
            assert!(
                sampled.iter().filter(|i| in_span(i)).count() >= 3,
                "{} q{}: {:?}",
                v.id,
                q.qid,
                q.span
            );
            hits += hit as usize;
            oracle_hits += oracle as usize;
            total += 1;
            let e = by_kind.entry(q.kind.name()).or_default();
            e.0 += hit as usize;
            e.1 += 1;
        }
    }
    let rate = hits as f64 / total as f64;
    eprintln!(
        "uniform K={k} of T={t}: hits the answer event in {hits}/{total} = {:.1}% of the questions (by kind: {by_kind:?}); oracle {oracle_hits}/{total}",
        100.0 * rate
    );
    assert_eq!(total, 1200);
    assert_eq!(oracle_hits, total);
    // Events of 6–8 frames against picks 20–22 frames apart: about 7/21 ≈ 1/3.
    assert!((0.2..0.45).contains(&rate), "uniform hit rate {rate}");
    assert!((synth::uniform_hit_rate(&world, t, k) - rate).abs() < 1e-12);
    assert!(world
        .videos
        .iter()
        .flat_map(|v| &v.questions)
        .any(|q| q.kind == QuestionKind::After));
}

#[test]
fn statements_and_captions_describe_what_is_visible() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let cfg = small(8);
    let s = write(&cfg, &dir, Mp4Mode::Never, 2);
    assert_eq!(s.caption_frames, 640);
    let world = World::generate(&cfg).unwrap();
    let text = std::fs::read_to_string(dir.join("captions.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 640);
    let mut by_frame: HashMap<(String, usize), &serde_json::Value> = HashMap::new();
    for l in &lines {
        let path = dir.join(l["path"].as_str().unwrap());
        assert!(path.is_file(), "{}", path.display());
        let key = (l["video"].as_str().unwrap().to_string(), l["frame"].as_u64().unwrap() as usize);
        assert_eq!(l["time"].as_f64().unwrap(), key.1 as f64 / 8.0);
        by_frame.insert(key, l);
    }
    let captions_of = |v: &str, i: usize| -> Vec<String> {
        by_frame[&(v.to_string(), i)]["captions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    };
    let colour_words = ["red", "green", "blue", "yellow", "purple", "orange"];
    for v in &world.videos {
        for q in &v.questions {
            let answer = q.answer_text();
            // The statement read back from the question text equals the generator's.
            assert_eq!(synth::statement(&q.question, answer).as_deref(), Some(q.statement.as_str()));
            assert!(q.statement.contains(answer), "{}", q.statement);
            let qa = synth::question_answer_text(&q.question, answer);
            for i in 0..64 {
                let t = i as f64 / 8.0;
                let caps = captions_of(&v.id, i);
                let in_span = q.span[0] <= t && t <= q.span[1];
                // Every caption form of the question is a true caption of exactly its span.
                for form in [&q.statement, &qa] {
                    assert_eq!(caps.contains(form), in_span, "{} frame {i}: `{form}` in {caps:?}", v.id);
                }
                if in_span {
                    assert!(caps.iter().any(|c| c == answer), "{} frame {i}: `{answer}` not in {caps:?}", v.id);
                }
            }
        }
        for i in 0..64 {
            let caps = captions_of(&v.id, i);
            if v.event_at(i).is_none() {
                assert!(caps.contains(&"grey circles moving".to_string()), "{caps:?}");
                assert!(
                    caps.iter().all(|c| !colour_words.iter().any(|w| c.split(' ').any(|x| x == *w))),
                    "{} frame {i}: an event-free frame is captioned with a colour: {caps:?}",
                    v.id
                );
            }
        }
    }
    // Examples of the templates.
    assert_eq!(
        synth::statement("what color was the square that appeared", "red").unwrap(),
        "the square that appeared was red"
    );
}

#[test]
fn output_is_written_atomically_and_not_overwritten_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let cfg = SynthConfig { videos: 2, ..small(9) };
    write(&cfg, &dir, Mp4Mode::Never, 1);
    let before = tree(&dir);
    let world = World::generate(&SynthConfig { seed: 10, ..cfg.clone() }).unwrap();
    let e = synth::write_world(
        &world,
        &dir,
        &WriteOptions {
            mp4: Mp4Mode::Never,
            ..Default::default()
        },
        &|_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(tree(&dir), before);
    // A failing write (ffmpeg missing with Mp4Mode::Always) leaves the old folder and no temp dir.
    let bad = WriteOptions {
        mp4: Mp4Mode::Always,
        overwrite: true,
        ffmpeg: Ffmpeg {
            ffmpeg: "/nonexistent/ffmpeg".into(),
            ..Ffmpeg::from_env()
        },
        ..Default::default()
    };
    let e = synth::write_world(&world, &dir, &bad, &|_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("not found"), "{e:#}");
    assert_eq!(tree(&dir), before);
    // Overwrite replaces it.
    let opts = WriteOptions {
        mp4: Mp4Mode::Never,
        overwrite: true,
        ..Default::default()
    };
    synth::write_world(&world, &dir, &opts, &|_| {}).unwrap();
    assert_ne!(tree(&dir)[Path::new("world.json")], before[Path::new("world.json")]);
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["w".to_string()], "left-overs next to the output");
    // Auto without ffmpeg: frame folders only, with the reason.
    let auto = WriteOptions { mp4: Mp4Mode::Auto, ..bad };
    let s = synth::write_world(&world, &tmp.path().join("auto"), &auto, &|_| {}).unwrap();
    assert!(!s.mp4 && s.mp4_skipped.as_deref().unwrap_or("").contains("not found"), "{s:?}");
}

#[test]
fn invalid_configs_name_the_field() {
    for (cfg, field) in [
        (
            SynthConfig {
                frames: 12,
                ..SynthConfig::default()
            },
            "frames",
        ),
        (
            SynthConfig {
                width: 40,
                height: 40,
                ..SynthConfig::default()
            },
            "event_size",
        ),
        (
            SynthConfig {
                events: 1,
                kinds: vec![QuestionKind::After],
                ..SynthConfig::default()
            },
            "temporal",
        ),
    ] {
        let e = World::generate(&cfg).unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
}
