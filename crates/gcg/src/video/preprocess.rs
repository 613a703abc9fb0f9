//! CLIP image pre-processing, bit-compatible with what GCG feeds its ViT.
//!
//! The official code (`utils/utils.py::image_transform(224)`, used by `utils/extract_features.py`)
//! opens each frame with PIL and applies torchvision's
//! `Resize(224, BICUBIC) → CenterCrop(224) → ToTensor() → Normalize(CLIP mean, std)`.
//! On a PIL image, `Resize` is `PIL.Image.resize` with `Image.BICUBIC`: a separable convolution
//! whose support grows with the down-scaling factor (antialiasing), computed in fixed point on
//! 8-bit data with a rounding to 8 bits after each pass. [`resize_bicubic`] re-implements that
//! algorithm (Pillow's `Resample.c`: filter `a = -0.5`, support 2 × scale, coefficients normalised
//! per output pixel and quantised to 22 fractional bits, horizontal pass first) so the resized
//! bytes equal Pillow's; the rest of the chain is plain arithmetic done in the same f32 order as
//! torchvision.
//!
//! Output sizes follow torchvision exactly: the short side becomes `size`, the long side
//! `int(size * long / short)` (truncated), and the centre crop starts at
//! `int(round((h - size) / 2))` with Python's round-half-to-even.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;

/// CLIP (OpenAI) normalisation mean, RGB (the published constants, verbatim).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP (OpenAI) normalisation std, RGB (the published constants, verbatim).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// The ViT input size of InstructBLIP / EVA ViT-g.
pub const CLIP_SIZE: u32 = 224;

/// Fixed-point precision of Pillow's 8-bit resampling (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel (a = -0.5), support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-pixel filter taps for one axis: `(first input index, fixed-point weights)`.
struct Taps {
    ksize: usize,
    bounds: Vec<(usize, usize)>, // (xmin, count) per output pixel
    weights: Vec<i32>,           // [out, ksize]
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full input range `[0, in_size)`.
fn precompute(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero; both values are then clamped to the image.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..count {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        }
        bounds.push((xmin, count));
    }
    Taps { ksize, bounds, weights }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an RGB image to `width × height` exactly as `PIL.Image.resize(..., Image.BICUBIC)` does
/// (antialiased when shrinking, byte-identical output).
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        bail!("cannot resize a {in_w}x{in_h} image to {width}x{height}");
    }
    if (in_w, in_h) == (width, height) {
        return Ok(img.clone());
    }
    let (in_w, in_h, out_w, out_h) = (in_w as usize, in_h as usize, width as usize, height as usize);
    let src = img.as_raw();
    let half = 1i32 << (PRECISION_BITS - 1);

    let vert = precompute(in_h, out_h);
    // Rows of the source that the vertical pass will read (Pillow only resamples those).
    let (y_first, y_last) = if in_h != out_h {
        let first = vert.bounds[0].0;
        let (lmin, lcount) = vert.bounds[out_h - 1];
        (first, lmin + lcount)
    } else {
        (0, in_h)
    };

    // Horizontal pass over the needed rows.
    let (tmp, tmp_rows_offset) = if in_w != out_w {
        let horiz = precompute(in_w, out_w);
        let rows = y_last - y_first;
        let mut tmp = vec![0u8; rows * out_w * 3];
        for r in 0..rows {
            let src_row = &src[(r + y_first) * in_w * 3..(r + y_first + 1) * in_w * 3];
            let dst_row = &mut tmp[r * out_w * 3..(r + 1) * out_w * 3];
            for xx in 0..out_w {
                let (xmin, count) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + count];
                let (mut s0, mut s1, mut s2) = (half, half, half);
                for (x, &w) in k.iter().enumerate() {
                    let p = (xmin + x) * 3;
                    s0 += src_row[p] as i32 * w;
                    s1 += src_row[p + 1] as i32 * w;
                    s2 += src_row[p + 2] as i32 * w;
                }
                dst_row[xx * 3] = clip8(s0);
                dst_row[xx * 3 + 1] = clip8(s1);
                dst_row[xx * 3 + 2] = clip8(s2);
            }
        }
        (tmp, y_first)
    } else {
        (src.to_vec(), 0)
    };

    if in_h == out_h {
        return RgbImage::from_raw(width, height, tmp).context("internal: resized buffer has the wrong length");
    }

    // Vertical pass.
    let mut out = vec![0u8; out_w * out_h * 3];
    let row_len = out_w * 3;
    for yy in 0..out_h {
        let (ymin, count) = vert.bounds[yy];
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + count];
        let dst_row = &mut out[yy * row_len..(yy + 1) * row_len];
        for (c, d) in dst_row.iter_mut().enumerate() {
            let mut s = half;
            for (y, &w) in k.iter().enumerate() {
                s += tmp[(ymin + y - tmp_rows_offset) * row_len + c] as i32 * w;
            }
            *d = clip8(s);
        }
    }
    RgbImage::from_raw(width, height, out).context("internal: resized buffer has the wrong length")
}

/// torchvision's output size for `Resize(size)` (an int): the short side becomes `size`, the long
/// side `int(size * long / short)`. Returns `(width, height)`.
pub fn shortest_side_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (size as f64 * long as f64 / short as f64) as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Python 3's `round()` for the non-negative halves that occur in crop offsets (half to even).
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        let f = x.floor();
        if (f as i64) % 2 == 0 {
            f as i64
        } else {
            f as i64 + 1
        }
    } else {
        r as i64
    }
}

/// torchvision's `CenterCrop(size)`: offsets `int(round((h - size) / 2))`, zero padding (as
/// torchvision does) when the image is smaller than the crop.
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let top = round_half_even((h as f64 - size as f64) / 2.0);
    let left = round_half_even((w as f64 - size as f64) / 2.0);
    let mut out = RgbImage::new(size, size);
    for y in 0..size as i64 {
        let sy = y + top;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..size as i64 {
            let sx = x + left;
            if sx < 0 || sx >= w as i64 {
                continue;
            }
            out.put_pixel(x as u32, y as u32, *img.get_pixel(sx as u32, sy as u32));
        }
    }
    out
}

/// `Resize(size, BICUBIC) + CenterCrop(size)` on 8-bit RGB: the crop that gets normalised.
pub fn resize_and_crop(img: &RgbImage, size: u32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("cannot pre-process an empty {w}x{h} image");
    }
    let (nw, nh) = shortest_side_size(w, h, size);
    let resized = resize_bicubic(img, nw, nh)?;
    Ok(center_crop(&resized, size))
}

/// `ToTensor() + Normalize(mean, std)` of an 8-bit RGB image, as CHW f32 values
/// (`(v / 255 - mean) / std`, in f32 like torchvision).
pub fn normalize_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let v = px.0[c] as f32 / 255.0;
            out[c * plane + i] = (v - mean[c]) / std[c];
        }
    }
    out
}

/// The full CLIP pre-processing of one frame: `[3, 224, 224]` CHW values, row-major.
pub fn clip_preprocess(img: &RgbImage) -> Result<Vec<f32>> {
    let crop = resize_and_crop(img, CLIP_SIZE)?;
    Ok(normalize_chw(&crop, CLIP_MEAN, CLIP_STD))
}

/// [`clip_preprocess`] as a tensor `[3, 224, 224]` (f32) on `dev`.
pub fn clip_tensor(img: &RgbImage, dev: &Device) -> Result<Tensor> {
    let s = CLIP_SIZE as usize;
    Ok(Tensor::from_vec(clip_preprocess(img)?, (3, s, s), dev)?)
}

/// Pre-process a batch of frames into `[N, 3, 224, 224]` (f32) on `dev`. Frames are processed on
/// up to `threads` worker threads (1 = in the calling thread).
pub fn clip_batch(imgs: &[RgbImage], threads: usize, dev: &Device) -> Result<Tensor> {
    clip_batch_refs(&imgs.iter().collect::<Vec<_>>(), threads, dev)
}

/// [`clip_batch`] over borrowed images.
pub fn clip_batch_refs(imgs: &[&RgbImage], threads: usize, dev: &Device) -> Result<Tensor> {
    let s = CLIP_SIZE as usize;
    let per = 3 * s * s;
    if imgs.is_empty() {
        bail!("clip_batch: no frames to pre-process");
    }
    let mut data = vec![0f32; imgs.len() * per];
    let threads = threads.clamp(1, imgs.len());
    if threads == 1 {
        for (img, dst) in imgs.iter().zip(data.chunks_mut(per)) {
            dst.copy_from_slice(&clip_preprocess(img)?);
        }
    } else {
        let chunk = imgs.len().div_ceil(threads);
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = imgs
                .chunks(chunk)
                .zip(data.chunks_mut(chunk * per))
                .map(|(src, dst)| {
                    scope.spawn(move || -> Result<()> {
                        for (img, d) in src.iter().zip(dst.chunks_mut(per)) {
                            d.copy_from_slice(&clip_preprocess(img)?);
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("a pre-processing thread panicked"))??;
            }
            Ok(())
        })?;
    }
    Ok(Tensor::from_vec(data, (imgs.len(), 3, s, s), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rounding_follow_torchvision() {
        assert_eq!(shortest_side_size(640, 480, 224), (298, 224));
        assert_eq!(shortest_side_size(239, 321, 224), (224, 300));
        assert_eq!(shortest_side_size(64, 48, 224), (298, 224));
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(37.0), 37);
        assert_eq!(round_half_even(3.4), 3);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(97, 61, image::Rgb([10, 128, 250]));
        for (w, h) in [(224, 224), (40, 30), (300, 301), (97, 224)] {
            let r = resize_bicubic(&img, w, h).unwrap();
            assert!(r.pixels().all(|p| p.0 == [10, 128, 250]), "{w}x{h}");
        }
    }
}
