//! Photos for image classifiers: decode a JPEG or PNG file to 8-bit RGB, resize it, crop its
//! centre and turn it into a normalised `[3, H, W]` f32 tensor — torchvision's
//! `Resize(256)`, `CenterCrop(224)`, `ToTensor()`, `Normalize(mean, std)` on a PIL image.
//!
//! The resize is PIL's bilinear filter (what torchvision uses for PIL images), reproduced to
//! the bit: a triangle filter widened by the scale factor when shrinking (antialiasing),
//! 22-bit fixed-point weights, a horizontal pass into an 8-bit image, then a vertical pass.
//! What remains different from PyTorch's pipeline is the JPEG decoder (the `image` crate's
//! zune-jpeg against PIL's libjpeg-turbo), which can move a pixel by a few levels.
//!
//! ```no_run
//! use nerve_data::vision::ImagePreprocess;
//!
//! let x = ImagePreprocess::imagenet().load("cat.jpg")?; // [3, 224, 224]
//! assert_eq!(x.dims(), &[3, 224, 224]);
//! # Ok::<(), nerve_data::DataError>(())
//! ```

use std::path::Path;

use nerve_core::Tensor;

use crate::error::{DataError, Result};

/// An 8-bit RGB image in row-major order, 3 interleaved bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub pixels: Vec<u8>,
}

/// Decode the JPEG or PNG file at `path` to RGB (greyscale is repeated, alpha dropped, as
/// PIL's `convert("RGB")`). Errors name the file.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_rgb(&bytes).map_err(|e| match e {
        DataError::Invalid(msg) => DataError::format(path, msg),
        e => e,
    })
}

/// Decode a JPEG or PNG image held in memory to RGB, as [`load_rgb`].
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let img = ::image::load_from_memory(bytes)
        .map_err(|e| DataError::Invalid(format!("not a readable JPEG or PNG image: {e}")))?;
    let rgb = img.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    RgbImage::new(width, height, rgb.into_raw())
}

/// Bits of the fractional part of PIL's fixed-point filter weights (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bilinear filter weights from `in_size` to `out_size` pixels
/// (`precompute_coeffs` + `normalize_coeffs_8bpc` in Pillow's `Resample.c`): for each output
/// pixel, the first input pixel, and the fixed-point weights of the input pixels from there.
fn bilinear_taps(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    // Shrinking widens the filter by the scale factor: the antialiasing.
    let filterscale = scale.max(1.0);
    let support = filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates towards zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let one = (1u64 << PRECISION_BITS) as f64;
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    if v < 0.0 {
                        (-0.5 + v * one) as i64
                    } else {
                        (0.5 + v * one) as i64
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

/// PIL's `clip8`: round the fixed-point sum (its half was added up front) and saturate.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

impl RgbImage {
    /// An image from its pixels, checking there are `width · height · 3` of them.
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || pixels.len() != width * height * 3 {
            return Err(DataError::Invalid(format!(
                "RgbImage: {} bytes for a {width}x{height} RGB image",
                pixels.len()
            )));
        }
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    /// Resized to `width` × `height` with PIL's bilinear filter (antialiased when
    /// shrinking), bit for bit: `Image.resize((width, height), Image.BILINEAR)`.
    pub fn resize(&self, width: usize, height: usize) -> Result<RgbImage> {
        if width == 0 || height == 0 {
            return Err(DataError::Invalid(format!(
                "resize: cannot resize a {}x{} image to {width}x{height}",
                self.width, self.height
            )));
        }
        // As PIL: a pass only along an axis whose size changes, horizontal first, through
        // an 8-bit intermediate image.
        let mut img = self.clone();
        if width != img.width {
            let taps = bilinear_taps(img.width, width);
            let mut out = vec![0u8; width * img.height * 3];
            for y in 0..img.height {
                let row = &img.pixels[y * img.width * 3..(y + 1) * img.width * 3];
                for (xx, (xmin, k)) in taps.iter().enumerate() {
                    let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                    for (j, &w) in k.iter().enumerate() {
                        let p = &row[(xmin + j) * 3..(xmin + j) * 3 + 3];
                        for c in 0..3 {
                            acc[c] += p[c] as i64 * w;
                        }
                    }
                    let o = (y * width + xx) * 3;
                    for c in 0..3 {
                        out[o + c] = clip8(acc[c]);
                    }
                }
            }
            img = RgbImage::new(width, img.height, out)?;
        }
        if height != img.height {
            let taps = bilinear_taps(img.height, height);
            let stride = img.width * 3;
            let mut out = vec![0u8; stride * height];
            for (yy, (ymin, k)) in taps.iter().enumerate() {
                let dst = &mut out[yy * stride..(yy + 1) * stride];
                for (i, d) in dst.iter_mut().enumerate() {
                    let mut acc = 1i64 << (PRECISION_BITS - 1);
                    for (j, &w) in k.iter().enumerate() {
                        acc += img.pixels[(ymin + j) * stride + i] as i64 * w;
                    }
                    *d = clip8(acc);
                }
            }
            img = RgbImage::new(img.width, height, out)?;
        }
        Ok(img)
    }

    /// Resized so that the shorter side is `size` pixels, keeping the aspect ratio as
    /// torchvision's `Resize(size)` does (the longer side is `⌊size · long / short⌋`).
    pub fn resize_short_side(&self, size: usize) -> Result<RgbImage> {
        let (short, long) = if self.width <= self.height {
            (self.width, self.height)
        } else {
            (self.height, self.width)
        };
        let new_long = ((size * long) as f64 / short as f64) as usize;
        if self.width <= self.height {
            self.resize(size, new_long)
        } else {
            self.resize(new_long, size)
        }
    }

    /// The centred `width` × `height` window, placed as torchvision's `CenterCrop` does
    /// (offsets `round((side - crop) / 2)`, halves rounded to even). The window must fit.
    pub fn center_crop(&self, width: usize, height: usize) -> Result<RgbImage> {
        if width == 0 || height == 0 || width > self.width || height > self.height {
            return Err(DataError::Invalid(format!(
                "center_crop: a {width}x{height} window does not fit a {}x{} image",
                self.width, self.height
            )));
        }
        let top = ((self.height - height) as f64 / 2.0).round_ties_even() as usize;
        let left = ((self.width - width) as f64 / 2.0).round_ties_even() as usize;
        let mut pixels = Vec::with_capacity(width * height * 3);
        for y in top..top + height {
            let start = (y * self.width + left) * 3;
            pixels.extend_from_slice(&self.pixels[start..start + width * 3]);
        }
        RgbImage::new(width, height, pixels)
    }

    /// `[3, height, width]` f32 with channel `c` mapped to `(v / 255 − mean[c]) / std[c]`,
    /// computed in f32 as torchvision's `ToTensor()` then `Normalize(mean, std)`.
    pub fn to_tensor(&self, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
        if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(DataError::Invalid(format!(
                "to_tensor: std {std:?} must be finite and non-zero"
            )));
        }
        let plane = self.width * self.height;
        let mut v = vec![0f32; 3 * plane];
        for (i, px) in self.pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                v[c * plane + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Ok(Tensor::from_vec(v, [3, self.height, self.width])?)
    }
}

/// The evaluation transform of an ImageNet classifier: resize the shorter side to `resize`,
/// crop the centre `crop` × `crop`, scale to `[0, 1]` and normalise each channel.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePreprocess {
    /// Shorter side after resizing (torchvision's `Resize(256)`).
    pub resize: usize,
    /// Side of the centre crop (`CenterCrop(224)`); at most `resize`.
    pub crop: usize,
    /// Per-channel mean subtracted from the `[0, 1]` values.
    pub mean: [f32; 3],
    /// Per-channel divisor after subtracting the mean.
    pub std: [f32; 3],
}

impl ImagePreprocess {
    /// ImageNet's channel means (torchvision's models).
    pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    /// ImageNet's channel standard deviations (torchvision's models).
    pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

    /// torchvision's classic evaluation transform: `Resize(256)`, `CenterCrop(224)`,
    /// ImageNet's mean and std.
    pub fn imagenet() -> Self {
        Self {
            resize: 256,
            crop: 224,
            mean: Self::IMAGENET_MEAN,
            std: Self::IMAGENET_STD,
        }
    }

    /// The transform applied to an already decoded image: `[3, crop, crop]` f32.
    pub fn apply(&self, img: &RgbImage) -> Result<Tensor> {
        if self.crop == 0 || self.crop > self.resize {
            return Err(DataError::Invalid(format!(
                "ImagePreprocess: crop {} must be between 1 and resize {}",
                self.crop, self.resize
            )));
        }
        img.resize_short_side(self.resize)?
            .center_crop(self.crop, self.crop)?
            .to_tensor(self.mean, self.std)
    }

    /// Decode the JPEG or PNG file at `path` and transform it: `[3, crop, crop]` f32.
    /// Errors name the file.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Tensor> {
        let path = path.as_ref();
        let img = load_rgb(path)?;
        self.apply(&img).map_err(|e| match e {
            DataError::Invalid(msg) => DataError::format(path, msg),
            e => e,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize) -> RgbImage {
        let pixels = (0..width * height * 3)
            .map(|i| ((i * 37 + i / 7) % 256) as u8)
            .collect();
        RgbImage::new(width, height, pixels).unwrap()
    }

    #[test]
    fn resize_to_the_same_size_is_the_identity() {
        let img = gradient(5, 4);
        assert_eq!(img.resize(5, 4).unwrap(), img);
    }

    #[test]
    fn resize_keeps_a_constant_image_constant() {
        let img = RgbImage::new(7, 5, [10u8, 200, 99].repeat(35)).unwrap();
        for (w, h) in [(3, 2), (11, 9), (7, 1)] {
            let r = img.resize(w, h).unwrap();
            assert!(r.pixels.chunks(3).all(|p| p == [10, 200, 99]), "{w}x{h}");
        }
    }

    #[test]
    fn halving_averages_pixel_pairs_with_their_neighbours() {
        // Shrinking 4 → 2: PIL's triangle of half-width 2 puts weights 1/8, 3/8, 3/8, 1/8
        // (renormalised at the border) on the inputs around each output pixel.
        let row: Vec<u8> = [0u8, 80, 160, 240].iter().flat_map(|&v| [v; 3]).collect();
        let r = RgbImage::new(4, 1, row).unwrap().resize(2, 1).unwrap();
        // out0 = (0·3 + 80·3 + 160·1) / 7 = 57.1; out1 = (80·1 + 160·3 + 240·3) / 7 = 182.9
        assert_eq!(r.pixels, vec![57, 57, 57, 183, 183, 183]);
    }

    #[test]
    fn short_side_and_centre_crop_follow_torchvision() {
        let img = gradient(640, 427);
        let r = img.resize_short_side(256).unwrap();
        assert_eq!((r.width, r.height), (383, 256));
        // (383 - 224) / 2 = 79.5 rounds to even: 80.
        let c = r.center_crop(224, 224).unwrap();
        assert_eq!(
            &c.pixels[..3],
            &r.pixels[(16 * 383 + 80) * 3..(16 * 383 + 80) * 3 + 3]
        );
        assert!(r.center_crop(400, 10).is_err());
    }

    #[test]
    fn to_tensor_normalises_each_channel() {
        let img = RgbImage::new(1, 1, vec![0, 255, 51]).unwrap();
        let t = img.to_tensor([0.5; 3], [0.5, 0.5, 0.25]).unwrap();
        assert_eq!(t.dims(), &[3, 1, 1]);
        let v = t.to_vec::<f32>().unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 1.0);
        assert!((v[2] - (0.2 - 0.5) / 0.25).abs() < 1e-6);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("nerve-vision-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("not-an-image.jpg");
        std::fs::write(&bad, b"hello").unwrap();
        let err = ImagePreprocess::imagenet()
            .load(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not-an-image.jpg"), "{err}");
        let missing = dir.join("missing.png");
        let err = load_rgb(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.png"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn png_round_trip_decodes_to_rgb() {
        let grid = crate::image::GridImage {
            width: 3,
            height: 2,
            channels: 3,
            pixels: (0..18).map(|i| i as u8 * 10).collect(),
        };
        let dir = std::env::temp_dir().join(format!("nerve-vision-png-{}", std::process::id()));
        let path = dir.join("x.png");
        crate::image::save_png(&grid, &path).unwrap();
        let img = load_rgb(&path).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(img.pixels, grid.pixels);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
