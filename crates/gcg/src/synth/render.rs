//! Rendering of synthetic frames: plain background, bouncing grey circles, the event's shape on
//! top. Pixels are sampled at their centres, without anti-aliasing, so every pixel of a shape has
//! exactly its colour.

use super::{Distractor, Shape, SynthConfig, SynthVideo};
use image::{Rgb, RgbImage};

/// Whether the point `(u, v)` (shape coordinates: the bounding box is [-1, 1]², v pointing down)
/// is inside the shape.
pub fn shape_contains(shape: Shape, u: f64, v: f64) -> bool {
    match shape {
        Shape::Square => u.abs() <= 0.8 && v.abs() <= 0.8,
        Shape::Diamond => u.abs() + v.abs() <= 1.0,
        // Apex up at v = -0.95, base at v = 0.8 from u = -0.95 to 0.95.
        Shape::Triangle => (-0.95..=0.8).contains(&v) && u.abs() <= 0.95 * (v + 0.95) / 1.75,
        Shape::Cross => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
        Shape::Star => in_star(u, v),
        Shape::Heart => {
            // (x² + y² − 1)³ − x² y³ ≤ 0, with y pointing up; spans x ∈ ±1.14, y ∈ [−1, 1.25].
            let x = u * 1.15;
            let y = -v * 1.12 + 0.12;
            let a = x * x + y * y - 1.0;
            a * a * a - x * x * y * y * y <= 0.0
        }
    }
}

/// A five-pointed star (outer radius 1, inner 0.5, one point up), by the even–odd rule.
fn in_star(u: f64, v: f64) -> bool {
    // The star spans y ∈ [−1, cos 36°]; shift it so that its bounding box is centred vertically.
    let v = v - (1.0 - (36f64).to_radians().cos()) / 2.0;
    let mut pts = [(0.0f64, 0.0f64); 10];
    for (k, p) in pts.iter_mut().enumerate() {
        let r = if k % 2 == 0 { 1.0 } else { 0.5 };
        let a = -std::f64::consts::FRAC_PI_2 + k as f64 * std::f64::consts::PI / 5.0;
        *p = (r * a.cos(), r * a.sin());
    }
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The centre of a distractor in frames `0..n`: straight lines, reflected at the borders.
pub(crate) fn distractor_track(d: &Distractor, cfg: &SynthConfig, n: usize) -> Vec<[f64; 2]> {
    let size = [cfg.width as f64, cfg.height as f64];
    let mut pos = d.pos;
    let mut vel = d.vel;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(pos);
        for a in 0..2 {
            pos[a] += vel[a];
            let (lo, hi) = (d.radius, size[a] - d.radius);
            if pos[a] < lo {
                pos[a] = (2.0 * lo - pos[a]).min(hi);
                vel[a] = -vel[a];
            } else if pos[a] > hi {
                pos[a] = (2.0 * hi - pos[a]).max(lo);
                vel[a] = -vel[a];
            }
        }
    }
    out
}

fn fill_disc(img: &mut RgbImage, c: [f64; 2], r: f64, rgb: [u8; 3]) {
    let (w, h) = img.dimensions();
    let x0 = (c[0] - r).floor().max(0.0) as u32;
    let y0 = (c[1] - r).floor().max(0.0) as u32;
    let x1 = ((c[0] + r).ceil().max(0.0) as u32).min(w);
    let y1 = ((c[1] + r).ceil().max(0.0) as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let dx = x as f64 + 0.5 - c[0];
            let dy = y as f64 + 0.5 - c[1];
            if dx * dx + dy * dy <= r * r {
                img.put_pixel(x, y, Rgb(rgb));
            }
        }
    }
}

fn fill_shape(img: &mut RgbImage, shape: Shape, c: [f64; 2], size: f64, rgb: [u8; 3]) {
    let (w, h) = img.dimensions();
    let half = size / 2.0;
    let x0 = (c[0] - half).floor().max(0.0) as u32;
    let y0 = (c[1] - half).floor().max(0.0) as u32;
    let x1 = ((c[0] + half).ceil().max(0.0) as u32).min(w);
    let y1 = ((c[1] + half).ceil().max(0.0) as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let u = (x as f64 + 0.5 - c[0]) / half;
            let v = (y as f64 + 0.5 - c[1]) / half;
            if u.abs() <= 1.0 && v.abs() <= 1.0 && shape_contains(shape, u, v) {
                img.put_pixel(x, y, Rgb(rgb));
            }
        }
    }
}

fn draw(cfg: &SynthConfig, video: &SynthVideo, i: usize, tracks: &[Vec<[f64; 2]>]) -> RgbImage {
    let mut img = RgbImage::from_pixel(cfg.width, cfg.height, Rgb(cfg.background));
    for (d, track) in video.distractors.iter().zip(tracks) {
        fill_disc(&mut img, track[i], d.radius, d.rgb);
    }
    // Events are drawn last: never occluded.
    for e in video.events.iter().filter(|e| e.contains_frame(i)) {
        fill_shape(&mut img, e.shape, e.center_at(i), e.size as f64, e.color.rgb());
    }
    img
}

/// Frame `i` of a video.
pub fn render_frame(cfg: &SynthConfig, video: &SynthVideo, i: usize) -> RgbImage {
    let tracks: Vec<Vec<[f64; 2]>> = video.distractors.iter().map(|d| distractor_track(d, cfg, i + 1)).collect();
    draw(cfg, video, i, &tracks)
}

/// All `cfg.frames` frames of a video.
pub fn render_video(cfg: &SynthConfig, video: &SynthVideo) -> Vec<RgbImage> {
    let tracks: Vec<Vec<[f64; 2]>> = video.distractors.iter().map(|d| distractor_track(d, cfg, cfg.frames)).collect();
    (0..cfg.frames).map(|i| draw(cfg, video, i, &tracks)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(shape: Shape) -> f64 {
        let n = 200;
        let mut k = 0;
        for y in 0..n {
            for x in 0..n {
                let u = (x as f64 + 0.5) / n as f64 * 2.0 - 1.0;
                let v = (y as f64 + 0.5) / n as f64 * 2.0 - 1.0;
                k += shape_contains(shape, u, v) as usize;
            }
        }
        k as f64 / (n * n) as f64
    }

    #[test]
    fn shapes_are_substantial_and_distinct() {
        // Fractions of the bounding box covered (computed by hand for the polygons):
        // square 0.64, diamond 0.5, triangle 1.75·1.9/2/4 ≈ 0.416, cross (2·0.6·1.9 − 0.36)/4 = 0.48.
        let want = [
            (Shape::Square, 0.64),
            (Shape::Diamond, 0.5),
            (Shape::Triangle, 0.415625),
            (Shape::Cross, 0.48),
        ];
        for (s, a) in want {
            assert!((area(s) - a).abs() < 0.01, "{s:?}: {} vs {a}", area(s));
        }
        // Star: area of a 10-gon with radii 1 and 0.5 = 10 · ½ · 1 · 0.5 · sin(36°) ≈ 1.469 → 0.367.
        assert!((area(Shape::Star) - 5.0 * 0.5 * (36f64).to_radians().sin() / 4.0).abs() < 0.01);
        // Heart: no closed form at hand; it covers a good part of its box and is not a box.
        let h = area(Shape::Heart);
        assert!((0.4..0.75).contains(&h), "heart {h}");
        // Shapes are recognisable by their masks: at least 12% of the box differs for every pair
        // (the closest pair, cross vs diamond, differs in 13.7%).
        let n = 64;
        for (i, &a) in Shape::ALL.iter().enumerate() {
            for &b in &Shape::ALL[i + 1..] {
                let mut diff = 0;
                for y in 0..n {
                    for x in 0..n {
                        let u = (x as f64 + 0.5) / n as f64 * 2.0 - 1.0;
                        let v = (y as f64 + 0.5) / n as f64 * 2.0 - 1.0;
                        diff += (shape_contains(a, u, v) != shape_contains(b, u, v)) as usize;
                    }
                }
                assert!(diff as f64 / (n * n) as f64 > 0.12, "{a:?} vs {b:?}: {diff}");
            }
        }
    }

    #[test]
    fn distractors_bounce_inside_the_frame() {
        let cfg = SynthConfig::default();
        let d = Distractor {
            pos: [10.0, 50.0],
            vel: [-3.0, 2.5],
            radius: 6.0,
            rgb: [120, 120, 120],
        };
        let t = distractor_track(&d, &cfg, 200);
        for p in &t {
            assert!(p[0] >= 6.0 && p[0] <= 58.0 && p[1] >= 6.0 && p[1] <= 58.0, "{p:?}");
        }
        // It did bounce (came back towards the right after hitting the left wall).
        assert!(t[3][0] > t[2][0] || t[4][0] > t[3][0]);
    }
}
