//! Images in chat messages, as OpenAI clients send them: content parts
//! `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`.
//!
//! A `data:` URL (`data:image/png;base64,...`) is decoded here; PNG, JPEG and WebP are accepted
//! (the `image` crate's decoders, the format sniffed from the bytes and checked against the
//! declared media type). Every limit is checked before the next step costs anything: the count
//! of images per request, the encoded size, then the pixel count from the header (a small file
//! can declare a huge image), and the decoder's own allocation cap. Decoding runs on a blocking
//! thread, so a large image does not hold up the HTTP workers.
//!
//! http(s) URLs are not fetched: a server that fetches what requests name can be made to reach
//! its own network (request forgery), so such a part is refused with a 400 that says to send the
//! image inline. Every error names the part, `messages[i].content[j]`.

use std::io::Cursor;

use base64::Engine as _;
use image::{ImageFormat, ImageReader, Limits};

use super::error::{ApiError, ErrorKind};
use super::wire::{Content, ContentPart, WireMessage};

/// Defaults of the `serve` flags.
pub mod defaults {
    /// Images one request may carry (vLLM's `--limit-mm-per-prompt` default for images is 1
    /// per prompt on most models; OpenAI allows many).
    pub const MAX_IMAGES: usize = 8;
    /// Largest encoded image, in bytes (after base64 decoding).
    pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;
    /// Largest decoded image, in pixels (about a 6,000 x 6,000 photo).
    pub const MAX_IMAGE_PIXELS: u64 = 36_000_000;
}

/// What an image may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    pub max_images: usize,
    pub max_bytes: usize,
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_images: defaults::MAX_IMAGES,
            max_bytes: defaults::MAX_IMAGE_BYTES,
            max_pixels: defaults::MAX_IMAGE_PIXELS,
        }
    }
}

/// A decoded image: 8-bit RGB, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Where the request gave it: `messages[i].content[j]`.
    pub part: String,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    /// `detail` as given (`auto` when absent).
    pub detail: Detail,
}

/// OpenAI's `detail`: how finely the model should look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Detail {
    #[default]
    Auto,
    Low,
    High,
}

/// An `image_url` part before decoding: where it sits and its encoded bytes.
struct Encoded {
    part: String,
    media_type: String,
    bytes: Vec<u8>,
    detail: Detail,
}

/// Every image of `messages`, in order, decoded; the first bad part is the error.
pub async fn decode_all(
    messages: &[WireMessage],
    limits: ImageLimits,
) -> Result<Vec<Image>, ApiError> {
    let encoded = encoded_parts(messages, limits)?;
    if encoded.is_empty() {
        return Ok(Vec::new());
    }
    tokio::task::spawn_blocking(move || encoded.into_iter().map(|e| decode(e, limits)).collect())
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("image decoding stopped: {e}")))?
}

/// The `image_url` parts of `messages` with their bytes, checked for count and size.
fn encoded_parts(messages: &[WireMessage], limits: ImageLimits) -> Result<Vec<Encoded>, ApiError> {
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let Some(Content::Parts(parts)) = &m.content else {
            continue;
        };
        for (j, part) in parts.iter().enumerate() {
            if part.kind != "image_url" {
                continue;
            }
            let at = format!("messages[{i}].content[{j}]");
            if out.len() == limits.max_images {
                return Err(ApiError::invalid(
                    at,
                    format!(
                        "a request may carry at most {} images (--max-images-per-request)",
                        limits.max_images
                    ),
                ));
            }
            out.push(encoded(part, at, limits)?);
        }
    }
    Ok(out)
}

fn encoded(part: &ContentPart, at: String, limits: ImageLimits) -> Result<Encoded, ApiError> {
    let Some(image) = &part.image_url else {
        return Err(ApiError::invalid(
            at,
            "an image_url content part needs `image_url`",
        ));
    };
    let detail = match image.detail.as_deref() {
        None | Some("auto") => Detail::Auto,
        Some("low") => Detail::Low,
        Some("high") => Detail::High,
        Some(other) => {
            return Err(ApiError::invalid(
                at,
                format!("`detail` must be auto, low or high, not {other:?}"),
            ))
        }
    };
    let url = image.url.trim();
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme = url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let why = if matches!(scheme.as_str(), "http" | "https") {
            "this server does not fetch image URLs (a server that fetches what requests name \
             can be turned against its own network); send the image inline as a data: URL, \
             e.g. data:image/png;base64,..."
        } else {
            "an image URL must be a data: URL, e.g. data:image/png;base64,..."
        };
        return Err(ApiError::invalid(at, why));
    };
    let Some((header, payload)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            at,
            "a data: URL needs a comma before its data",
        ));
    };
    let Some(media_type) = header.strip_suffix(";base64") else {
        return Err(ApiError::invalid(
            at,
            "an image data: URL must be base64 (…;base64,)",
        ));
    };
    let media_type = media_type.to_ascii_lowercase();
    if format_of(&media_type).is_none() {
        return Err(ApiError::invalid(
            at,
            format!(
                "unsupported image type {media_type:?}: send image/png, image/jpeg or image/webp"
            ),
        ));
    }
    // base64 grows data by 4/3: refuse an oversized image before decoding it.
    if payload.len() / 4 * 3 > limits.max_bytes + 3 {
        return Err(too_large(at, payload.len() / 4 * 3, limits));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim_end())
        .map_err(|e| {
            ApiError::invalid(at.clone(), format!("the image's base64 is malformed: {e}"))
        })?;
    if bytes.len() > limits.max_bytes {
        return Err(too_large(at, bytes.len(), limits));
    }
    Ok(Encoded {
        part: at,
        media_type,
        bytes,
        detail,
    })
}

fn too_large(at: String, bytes: usize, limits: ImageLimits) -> ApiError {
    ApiError::invalid(
        at,
        format!(
            "the image is {bytes} bytes, more than the {} this server accepts (--max-image-bytes)",
            limits.max_bytes
        ),
    )
}

/// The decoder for a media type this server accepts.
fn format_of(media_type: &str) -> Option<ImageFormat> {
    match media_type {
        "image/png" => Some(ImageFormat::Png),
        "image/jpeg" | "image/jpg" => Some(ImageFormat::Jpeg),
        "image/webp" => Some(ImageFormat::WebP),
        _ => None,
    }
}

/// One image decoded to RGB, its header's size checked first.
fn decode(e: Encoded, limits: ImageLimits) -> Result<Image, ApiError> {
    let at = e.part;
    let bad = |what: String| ApiError::invalid(at.clone(), what);
    let reader = ImageReader::new(Cursor::new(&e.bytes))
        .with_guessed_format()
        .map_err(|err| bad(format!("cannot read the image: {err}")))?;
    let declared = format_of(&e.media_type);
    match reader.format() {
        Some(found) if Some(found) == declared => {}
        Some(found) => {
            return Err(bad(format!(
                "the data is {} but the URL says {}",
                found.to_mime_type(),
                e.media_type
            )))
        }
        None => return Err(bad(format!("the data is not a {} image", e.media_type))),
    }
    let (width, height) = reader
        .into_dimensions()
        .map_err(|err| bad(format!("cannot decode the image: {err}")))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(bad(format!(
            "the image is {width}x{height}, more than the {} pixels this server accepts",
            limits.max_pixels
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(&e.bytes))
        .with_guessed_format()
        .map_err(|err| bad(format!("cannot read the image: {err}")))?;
    let mut caps = Limits::default();
    // RGBA at 16 bits per channel is the most a decoder may hold per pixel.
    caps.max_alloc = Some(pixels.saturating_mul(8).max(1 << 20));
    reader.limits(caps);
    let decoded = reader
        .decode()
        .map_err(|err| bad(format!("cannot decode the image: {err}")))?;
    Ok(Image {
        part: at,
        width,
        height,
        rgb: decoded.into_rgb8().into_raw(),
        detail: e.detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::wire::{ImageUrl, Role};
    use image::{Rgb, RgbImage};

    fn picture(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 40) as u8, (y * 40) as u8, 200]))
    }

    fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    fn data_url(media_type: &str, bytes: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        format!("data:{media_type};base64,{b64}")
    }

    /// One user message: a text part, then an image part per URL.
    fn message(urls: &[String]) -> Vec<WireMessage> {
        let text = ContentPart {
            kind: "text".into(),
            text: Some("What is this?".into()),
            image_url: None,
        };
        let images = urls.iter().map(|url| ContentPart {
            kind: "image_url".into(),
            text: None,
            image_url: Some(ImageUrl {
                url: url.clone(),
                detail: None,
            }),
        });
        vec![WireMessage {
            role: Role::User,
            content: Some(Content::Parts(
                std::iter::once(text).chain(images).collect(),
            )),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }]
    }

    async fn refused(urls: &[String], limits: ImageLimits) -> ApiError {
        decode_all(&message(urls), limits)
            .await
            .expect_err("refused")
    }

    #[tokio::test]
    async fn png_jpeg_and_webp_decode_to_their_pixels() {
        let img = picture(5, 3);
        let urls = [
            data_url("image/png", &encode(&img, ImageFormat::Png)),
            data_url("image/jpeg", &encode(&img, ImageFormat::Jpeg)),
            data_url("image/webp", &encode(&img, ImageFormat::WebP)),
        ];
        let got = decode_all(&message(&urls), ImageLimits::default())
            .await
            .expect("decoded");
        assert_eq!(got.len(), 3);
        for (j, image) in got.iter().enumerate() {
            assert_eq!(image.part, format!("messages[0].content[{}]", j + 1));
            assert_eq!((image.width, image.height), (5, 3));
            assert_eq!(image.rgb.len(), 5 * 3 * 3);
        }
        // PNG and lossless WebP keep every pixel; JPEG is lossy.
        assert_eq!(got[0].rgb, img.as_raw().clone());
        assert_eq!(got[2].rgb, img.as_raw().clone());
    }

    #[tokio::test]
    async fn each_bad_image_is_a_400_naming_its_part() {
        let png = encode(&picture(4, 4), ImageFormat::Png);
        let ok = data_url("image/png", &png);
        let cases: Vec<(String, &str)> = vec![
            (
                data_url("image/png", b"not a png at all"),
                "not a image/png",
            ),
            (
                data_url("image/png", &png[..png.len() / 2]),
                "cannot decode",
            ),
            (
                data_url("image/jpeg", &png),
                "the data is image/png but the URL says image/jpeg",
            ),
            (data_url("image/gif", b"GIF89a"), "unsupported image type"),
            ("data:image/png;base64,@@@@".into(), "base64 is malformed"),
            ("data:image/png,rawbytes".into(), "must be base64"),
            (
                "https://example.com/cat.png".into(),
                "does not fetch image URLs",
            ),
            ("file:///etc/passwd".into(), "must be a data: URL"),
        ];
        for (url, says) in cases {
            let e = refused(&[ok.clone(), url.clone()], ImageLimits::default()).await;
            assert_eq!(e.status(), 400, "{url:.40}");
            assert_eq!(
                e.param.as_deref(),
                Some("messages[0].content[2]"),
                "{url:.40}"
            );
            assert!(e.message.contains(says), "{url:.40}: {}", e.message);
        }
    }

    #[tokio::test]
    async fn limits_on_count_bytes_and_pixels_are_400s() {
        let png = encode(&picture(20, 20), ImageFormat::Png);
        let url = data_url("image/png", &png);
        let few = ImageLimits {
            max_images: 2,
            ..ImageLimits::default()
        };
        let e = refused(&[url.clone(), url.clone(), url.clone()], few).await;
        assert_eq!(e.param.as_deref(), Some("messages[0].content[3]"));
        assert!(e.message.contains("at most 2 images"), "{}", e.message);
        let small = ImageLimits {
            max_bytes: png.len() - 1,
            ..ImageLimits::default()
        };
        let e = refused(std::slice::from_ref(&url), small).await;
        assert!(e.message.contains("--max-image-bytes"), "{}", e.message);
        let tiny = ImageLimits {
            max_pixels: 399,
            ..ImageLimits::default()
        };
        let e = refused(std::slice::from_ref(&url), tiny).await;
        assert!(e.message.contains("20x20"), "{}", e.message);
        let exact = ImageLimits {
            max_images: 1,
            max_bytes: png.len(),
            max_pixels: 400,
        };
        assert_eq!(
            decode_all(&message(&[url]), exact)
                .await
                .expect("fits")
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn detail_is_checked_and_kept() {
        let url = data_url("image/png", &encode(&picture(2, 2), ImageFormat::Png));
        let mut messages = message(&[url]);
        let Some(Content::Parts(parts)) = &mut messages[0].content else {
            panic!("parts")
        };
        let image = parts[1].image_url.as_mut().expect("image");
        image.detail = Some("low".into());
        let got = decode_all(&messages, ImageLimits::default())
            .await
            .expect("ok");
        assert_eq!(got[0].detail, Detail::Low);
        let Some(Content::Parts(parts)) = &mut messages[0].content else {
            panic!("parts")
        };
        parts[1].image_url.as_mut().expect("image").detail = Some("ultra".into());
        let e = decode_all(&messages, ImageLimits::default())
            .await
            .expect_err("bad");
        assert!(e.message.contains("auto, low or high"), "{}", e.message);
    }
}
