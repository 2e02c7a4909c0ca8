//! Idefics3's image processor without image splitting: what turns an RGB image into the
//! `pixel_values` the vision tower takes. As `Idefics3ImageProcessor` does with
//! `do_image_splitting: false`: the longest edge is resized to `size.longest_edge` keeping the
//! aspect ratio (the other edge rounded down, then up to even), then the image is resized to the
//! encoder's square `max_image_size` (aspect not kept), both with Lanczos resampling; values are
//! rescaled by 1/255 and normalised per channel. Splitting large images into tiles plus a global
//! view (SmolVLM's default) is not supported: each image is one global view.
//!
//! Resampling is the `image` crate's Lanczos3, not Pillow's: the two round their two passes
//! differently, so pixel values differ from the Python processor's by a fifth of an 8-bit level
//! on average and by up to 14 levels where sharp edges ring (`models/tests/vision.rs`).

use candle_core::{Device, Tensor};
use image::imageops::{resize, FilterType};
use image::RgbImage;

use crate::error::{ModelError, Result};

/// The largest edge Idefics3's processor ever resizes to (`MAX_IMAGE_SIZE`).
const MAX_EDGE: u32 = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// `size.longest_edge`: the first resize's target.
    pub longest_edge: u32,
    /// `max_image_size.longest_edge`: the side of the square the encoder takes.
    pub image_size: u32,
    pub rescale_factor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessor {
    /// SmolVLM's settings for an encoder of `image_size` pixels: a first resize to 4x that
    /// edge, values mapped to [-1, 1].
    pub fn smolvlm(image_size: u32) -> Self {
        Self {
            longest_edge: 4 * image_size,
            image_size,
            rescale_factor: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    /// The settings of `dir/preprocessor_config.json` (`size.longest_edge`,
    /// `max_image_size.longest_edge`, `rescale_factor`, `image_mean`, `image_std`), each
    /// defaulting to SmolVLM's for an encoder of `image_size`; [`ImageProcessor::smolvlm`]
    /// when there is no such file. The encoder's size wins over a different `max_image_size`.
    pub fn read(dir: &std::path::Path, image_size: u32) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let mut p = Self::smolvlm(image_size);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(p);
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if let Some(edge) = json["size"]["longest_edge"].as_u64() {
            p.longest_edge = edge as u32;
        }
        if let Some(f) = json["rescale_factor"].as_f64() {
            p.rescale_factor = f as f32;
        }
        let triple = |v: &serde_json::Value| -> Option<[f32; 3]> {
            let a = v.as_array()?;
            Some([
                a.first()?.as_f64()? as f32,
                a.get(1)?.as_f64()? as f32,
                a.get(2)?.as_f64()? as f32,
            ])
        };
        if let Some(m) = triple(&json["image_mean"]) {
            p.mean = m;
        }
        if let Some(s) = triple(&json["image_std"]) {
            p.std = s;
        }
        Ok(p)
    }

    /// `(3, image_size, image_size)` pixel values of an RGB image (`rgb`: `width * height * 3`
    /// bytes, row-major).
    pub fn pixel_values(
        &self,
        rgb: &[u8],
        width: u32,
        height: u32,
        device: &Device,
    ) -> Result<Tensor> {
        let image = RgbImage::from_raw(width, height, rgb.to_vec()).ok_or_else(|| {
            ModelError::Config(format!(
                "{} bytes are not a {width}x{height} RGB image",
                rgb.len()
            ))
        })?;
        let (w, h) = longest_edge_size(width, height, self.longest_edge);
        let (w, h) = below_max_edge(w, h);
        let image = resize(&image, w, h, FilterType::Lanczos3);
        let s = self.image_size;
        let image = resize(&image, s, s, FilterType::Lanczos3);
        let plane = (s * s) as usize;
        let mut values = vec![0f32; 3 * plane];
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                let x = f32::from(pixel.0[c]) * self.rescale_factor;
                values[c * plane + i] = (x - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(
            values,
            (3, s as usize, s as usize),
            device,
        )?)
    }
}

/// `_resize_output_size_rescale_to_max_len`: the longest edge to `max_len`, the other scaled
/// with it, rounded down and then up to even; `(width, height)`.
fn longest_edge_size(width: u32, height: u32, max_len: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let (w, h) = if width >= height {
        let h = (f64::from(max_len) / aspect) as u32;
        (max_len, h + h % 2)
    } else {
        let w = (f64::from(max_len) * aspect) as u32;
        (w + w % 2, max_len)
    };
    (w.max(1), h.max(1))
}

/// `_resize_output_size_scale_below_upper_bound` with `MAX_IMAGE_SIZE`.
fn below_max_edge(width: u32, height: u32) -> (u32, u32) {
    let aspect = f64::from(width) / f64::from(height);
    let (w, h) = if width >= height && width > MAX_EDGE {
        (MAX_EDGE, (f64::from(MAX_EDGE) / aspect) as u32)
    } else if height > width && height > MAX_EDGE {
        ((f64::from(MAX_EDGE) * aspect) as u32, MAX_EDGE)
    } else {
        (width, height)
    };
    (w.max(1), h.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_python_rounding() {
        // width >= height: height = int(64 / (96 / 60)) = 40, even.
        assert_eq!(longest_edge_size(96, 60, 64), (64, 40));
        // int(64 / (20 / 12)) = 38.
        assert_eq!(longest_edge_size(20, 12, 64), (64, 38));
        // Portrait: width = int(64 * 45 / 100) = 28; odd results round up to even.
        assert_eq!(longest_edge_size(45, 100, 64), (28, 64));
        assert_eq!(longest_edge_size(49, 100, 64), (32, 64));
        assert_eq!(below_max_edge(8000, 2000), (4096, 1024));
        assert_eq!(below_max_edge(300, 200), (300, 200));
    }

    #[test]
    fn a_wrong_byte_count_is_an_error() {
        let p = ImageProcessor::smolvlm(32);
        assert!(p.pixel_values(&[0; 10], 2, 2, &Device::Cpu).is_err());
        let ok = p.pixel_values(&[0; 12], 2, 2, &Device::Cpu).expect("2x2");
        assert_eq!(ok.dims(), &[3, 32, 32]);
    }
}
