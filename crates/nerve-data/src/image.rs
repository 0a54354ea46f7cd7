//! Image grids as PNG files: a batch of images `[N, C, H, W]` laid out in rows (like
//! torchvision's `make_grid` + `save_image`), greyscale (`C = 1`) or RGB (`C = 3`).
//!
//! ```no_run
//! use nerve_core::Tensor;
//! use nerve_data::image::save_png_grid;
//!
//! // 16 samples in [-1, 1], 4 per row.
//! let samples = Tensor::rand([16, 1, 28, 28]).affine(2.0, -1.0)?;
//! save_png_grid(&samples, 4, (-1.0, 1.0), "samples.png")?;
//! # Ok::<(), nerve_data::DataError>(())
//! ```

use std::path::{Path, PathBuf};

use nerve_core::Tensor;

use crate::error::{DataError, Result};

/// Pixels between (and around) the images of a grid written by [`save_png_grid`]
/// (torchvision's default).
pub const GRID_PADDING: usize = 2;

/// An 8-bit image in row-major order, `channels` interleaved bytes per pixel (1: grey, 3: RGB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GridImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Bytes per pixel: 1 (greyscale) or 3 (RGB).
    pub channels: usize,
    /// `height · width · channels` bytes.
    pub pixels: Vec<u8>,
}

/// Lay out `images` `[N, C, H, W]` (C = 1 or 3) in rows of `nrow` images with `padding` black
/// pixels between and around them, as torchvision's `make_grid`. Values are clamped to
/// `range = (lo, hi)` and mapped linearly to 0..=255 (rounded); use `(-1.0, 1.0)` for
/// diffusion samples and `(0.0, 1.0)` for data in the unit range.
pub fn make_grid(
    images: &Tensor,
    nrow: usize,
    padding: usize,
    range: (f64, f64),
) -> Result<GridImage> {
    let d = images.dims();
    if images.rank() != 4 || !(d[1] == 1 || d[1] == 3) || d[0] == 0 || d[2] == 0 || d[3] == 0 {
        return Err(DataError::Invalid(format!(
            "make_grid: expected images [N, 1 or 3, H, W] with N, H, W > 0, got {d:?}"
        )));
    }
    if nrow == 0 {
        return Err(DataError::Invalid(
            "make_grid: nrow must be at least 1".into(),
        ));
    }
    let (lo, hi) = range;
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Err(DataError::Invalid(format!(
            "make_grid: range ({lo}, {hi}) must be finite with lo < hi"
        )));
    }
    let (n, c, h, w) = (d[0], d[1], d[2], d[3]);
    let cols = nrow.min(n);
    let rows = n.div_ceil(cols);
    let width = cols * (w + padding) + padding;
    let height = rows * (h + padding) + padding;
    let values = images.to_f64_vec();
    let mut pixels = vec![0u8; width * height * c];
    let to_byte = |v: f64| -> u8 {
        // NaN maps to 0, like a clamp that never saw it.
        let u = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
        if u.is_nan() {
            0
        } else {
            (u * 255.0 + 0.5).floor() as u8
        }
    };
    for k in 0..n {
        let (top, left) = (
            padding + (k / cols) * (h + padding),
            padding + (k % cols) * (w + padding),
        );
        for ch in 0..c {
            let plane = &values[(k * c + ch) * h * w..(k * c + ch + 1) * h * w];
            for y in 0..h {
                for x in 0..w {
                    pixels[((top + y) * width + left + x) * c + ch] = to_byte(plane[y * w + x]);
                }
            }
        }
    }
    Ok(GridImage {
        width,
        height,
        channels: c,
        pixels,
    })
}

/// Write `grid` as a PNG file (8-bit grey or RGB), atomically: through a temporary file in
/// the same folder and a rename, so a reader never sees half an image. Errors name the file.
pub fn save_png(grid: &GridImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let color = match grid.channels {
        1 => ::image::ExtendedColorType::L8,
        3 => ::image::ExtendedColorType::Rgb8,
        c => {
            return Err(DataError::Invalid(format!(
                "{}: PNG grids have 1 or 3 channels, not {c}",
                path.display()
            )))
        }
    };
    if grid.pixels.len() != grid.width * grid.height * grid.channels {
        return Err(DataError::Invalid(format!(
            "{}: {} bytes for a {}x{}x{} image",
            path.display(),
            grid.pixels.len(),
            grid.width,
            grid.height,
            grid.channels
        )));
    }
    let dims = (u32::try_from(grid.width), u32::try_from(grid.height));
    let (Ok(width), Ok(height)) = dims else {
        return Err(DataError::Invalid(format!(
            "{}: image {}x{} too large for PNG",
            path.display(),
            grid.width,
            grid.height
        )));
    };
    let mut bytes = Vec::new();
    ::image::ImageEncoder::write_image(
        ::image::codecs::png::PngEncoder::new(&mut bytes),
        &grid.pixels,
        width,
        height,
        color,
    )
    .map_err(|e| DataError::io(path, std::io::Error::other(e)))?;
    write_atomic(path, &bytes)
}

/// Write `images` `[N, C, H, W]` (C = 1 or 3, values in `range`) as one PNG grid with `nrow`
/// images per row and [`GRID_PADDING`] pixels between them; see [`make_grid`] and
/// [`save_png`].
pub fn save_png_grid(
    images: &Tensor,
    nrow: usize,
    range: (f64, f64),
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let grid = make_grid(images, nrow, GRID_PADDING, range).map_err(|e| match e {
        DataError::Invalid(msg) => DataError::Invalid(format!("{}: {msg}", path.display())),
        e => e,
    })?;
    save_png(&grid, path)
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| DataError::io(path, e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nerve-image-{}-{name}", std::process::id()))
    }

    #[test]
    fn grey_grid_round_trips_through_png() -> Result<()> {
        // Five 2x3 images in [-1, 1], three per row: a 2-row grid with the last cell empty.
        let v: Vec<f32> = (0..5 * 6).map(|i| (i as f32 / 29.0) * 2.0 - 1.0).collect();
        let images = Tensor::from_vec(v.clone(), [5, 1, 2, 3])?;
        let path = temp_path("grey.png");
        save_png_grid(&images, 3, (-1.0, 1.0), &path)?;
        let back = ::image::open(&path)
            .map_err(|e| DataError::Invalid(e.to_string()))?
            .into_luma8();
        std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
        let p = GRID_PADDING;
        assert_eq!(
            back.dimensions(),
            ((3 * (3 + p) + p) as u32, (2 * (2 + p) + p) as u32)
        );
        for k in 0..5 {
            for y in 0..2 {
                for x in 0..3 {
                    let want = (((v[k * 6 + y * 3 + x] + 1.0) / 2.0) * 255.0 + 0.5).floor() as u8;
                    let (px, py) = (p + (k % 3) * (3 + p) + x, p + (k / 3) * (2 + p) + y);
                    assert_eq!(
                        back.get_pixel(px as u32, py as u32).0[0],
                        want,
                        "image {k} ({x}, {y})"
                    );
                }
            }
        }
        // Padding and the empty sixth cell are black.
        assert_eq!(back.get_pixel(0, 0).0[0], 0);
        let (ex, ey) = (p + 2 * (3 + p), p + (2 + p));
        assert_eq!(back.get_pixel(ex as u32, ey as u32).0[0], 0);
        Ok(())
    }

    #[test]
    fn rgb_grid_keeps_channels_and_clamps_to_the_range() -> Result<()> {
        // One 1x2 RGB image in [0, 1] with out-of-range values.
        let images = Tensor::from_vec(vec![1.0f32, -0.5, 0.0, 2.0, 0.5, 0.25], [1, 3, 1, 2])?;
        let path = temp_path("rgb.png");
        save_png_grid(&images, 8, (0.0, 1.0), &path)?;
        let back = ::image::open(&path)
            .map_err(|e| DataError::Invalid(e.to_string()))?
            .into_rgb8();
        std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
        let p = GRID_PADDING as u32;
        assert_eq!(back.dimensions(), (2 + 2 * p, 1 + 2 * p));
        assert_eq!(back.get_pixel(p, p).0, [255, 0, 128]);
        assert_eq!(back.get_pixel(p + 1, p).0, [0, 255, 64]);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_refused_with_the_file_named() {
        let path = temp_path("bad.png");
        let two_channels = Tensor::zeros([1, 2, 4, 4]);
        let e = save_png_grid(&two_channels, 1, (0.0, 1.0), &path).unwrap_err();
        assert!(e.to_string().contains("bad.png"), "{e}");
        assert!(!path.exists());
        let e = save_png_grid(&Tensor::zeros([1, 1, 4, 4]), 0, (0.0, 1.0), &path).unwrap_err();
        assert!(e.to_string().contains("nrow"), "{e}");
        let e = save_png_grid(&Tensor::zeros([1, 1, 4, 4]), 1, (1.0, 1.0), &path).unwrap_err();
        assert!(e.to_string().contains("range"), "{e}");
        // A folder where the file should go: the write fails, naming the path.
        let dir = temp_path("a-folder.png");
        std::fs::create_dir_all(&dir).unwrap();
        let e = save_png_grid(&Tensor::zeros([1, 1, 4, 4]), 1, (0.0, 1.0), &dir).unwrap_err();
        assert!(e.to_string().contains("a-folder.png"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
