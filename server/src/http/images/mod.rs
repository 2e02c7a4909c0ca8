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
//! http(s) URLs are fetched only from the hosts `--allowed-media-domains` names (`fetch.rs`):
//! with none (the default) such a part is refused with a 400 that says to send the image
//! inline. Every error names the part, `messages[i].content[j]`.

mod fetch;
mod prompt;

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use base64::Engine as _;
use image::{ImageFormat, ImageReader, Limits};

use super::error::{ApiError, ErrorKind};
use super::wire::{Content, ContentPart, WireMessage};
pub use fetch::ImageFetcher;
use fetch::Remote;
pub use prompt::{text_only, VisionPrompt, IMAGE_MARKER};

/// Defaults of the `serve` flags.
pub mod defaults {
    /// Images one request may carry (vLLM's `--limit-mm-per-prompt` default for images is 1
    /// per prompt on most models; OpenAI allows many).
    pub const MAX_IMAGES: usize = 8;
    /// Largest encoded image, in bytes (after base64 decoding).
    pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;
    /// Largest decoded image, in pixels (about a 6,000 x 6,000 photo).
    pub const MAX_IMAGE_PIXELS: u64 = 36_000_000;
    /// Seconds an image URL may take to fetch (vLLM's `VLLM_IMAGE_FETCH_TIMEOUT`).
    pub const FETCH_TIMEOUT: u64 = 5;
}

/// What reading an image's header may allocate (its metadata, before the pixels).
const HEADER_ALLOC: u64 = 16 * 1024 * 1024;

/// At most this many images are decoded or encoded at once, server-wide: the work runs on
/// blocking threads outside the engine's scheduler, and each holds up to an image's pixels.
fn image_work() -> &'static Arc<Semaphore> {
    static WORK: OnceLock<Arc<Semaphore>> = OnceLock::new();
    WORK.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Semaphore::new(cores))
    })
}

/// Runs `work` on a blocking thread once a slot of [`image_work`] is free; the slot is held by
/// the work itself, so a client that leaves does not free it before the work ends.
pub(crate) async fn on_image_thread<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let stopped = |e: String| ApiError::new(ErrorKind::Internal, format!("{what} stopped: {e}"));
    let permit = image_work()
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| stopped(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let out = work();
        drop(permit);
        out
    })
    .await
    .map_err(|e| stopped(e.to_string()))
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

/// Where images may come from and what they may be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub limits: ImageLimits,
    /// Fetches http(s) image URLs of allowed hosts; `None`: none are fetched.
    pub fetcher: Option<ImageFetcher>,
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

/// Where the first image part of `messages` sits (`messages[i].content[j]`), if any.
pub fn first_image_part(messages: &[WireMessage]) -> Option<String> {
    image_parts(messages).next().map(|(at, _)| at)
}

/// The `image_url` parts of `messages`, in order, each with where it sits.
fn image_parts(messages: &[WireMessage]) -> impl Iterator<Item = (String, &ContentPart)> {
    messages.iter().enumerate().flat_map(|(i, m)| {
        let parts = match &m.content {
            Some(Content::Parts(parts)) => parts.as_slice(),
            _ => &[],
        };
        let images = parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == "image_url");
        images.map(move |(j, p)| (format!("messages[{i}].content[{j}]"), p))
    })
}

/// An image part before its bytes are at hand.
enum Source {
    Inline(Encoded),
    Remote(Remote),
}

/// Every image of `messages`, in order, fetched where it is a URL and decoded; the first bad
/// part is the error.
pub async fn decode_all(
    messages: &[WireMessage],
    config: &ImageConfig,
) -> Result<Vec<Image>, ApiError> {
    let limits = config.limits;
    let sources = sources(messages, config)?;
    if sources.is_empty() {
        return Ok(Vec::new());
    }
    let mut encoded = Vec::with_capacity(sources.len());
    for source in sources {
        encoded.push(match (source, &config.fetcher) {
            (Source::Inline(e), _) => e,
            (Source::Remote(r), Some(fetcher)) => fetcher.fetch(r, limits).await?,
            (Source::Remote(r), None) => return Err(not_fetched(r.part)),
        });
    }
    on_image_thread("image decoding", move || {
        encoded.into_iter().map(|e| decode(e, limits)).collect()
    })
    .await?
}

/// The `image_url` parts of `messages`: inline ones with their bytes, checked for count and
/// size; URLs checked against the allowed hosts.
fn sources(messages: &[WireMessage], config: &ImageConfig) -> Result<Vec<Source>, ApiError> {
    let limits = config.limits;
    let mut out = Vec::new();
    for (at, part) in image_parts(messages) {
        if out.len() == limits.max_images {
            return Err(ApiError::invalid(
                at,
                format!(
                    "a request may carry at most {} images (--max-images-per-request)",
                    limits.max_images
                ),
            ));
        }
        out.push(source(part, at, config)?);
    }
    Ok(out)
}

fn source(part: &ContentPart, at: String, config: &ImageConfig) -> Result<Source, ApiError> {
    let limits = config.limits;
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
        return match (scheme.as_str(), &config.fetcher) {
            ("http" | "https", Some(fetcher)) => {
                Ok(Source::Remote(fetcher.check(at, url, detail)?))
            }
            ("http" | "https", None) => Err(not_fetched(at)),
            _ => Err(ApiError::invalid(
                at,
                "an image URL must be a data: URL (data:image/png;base64,...) or, where the \
                 server allows its host, an http(s) URL",
            )),
        };
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
    Ok(Source::Inline(Encoded {
        part: at,
        media_type,
        bytes,
        detail,
    }))
}

fn not_fetched(at: String) -> ApiError {
    ApiError::invalid(
        at,
        "this server does not fetch image URLs (a server that fetches what requests name can be \
         turned against its own network; an operator may allow hosts with \
         --allowed-media-domains); send the image inline as a data: URL, e.g. \
         data:image/png;base64,...",
    )
}

/// `bytes`: the image's size, or as much of it as was read before it went over.
fn too_large(at: String, bytes: usize, limits: ImageLimits) -> ApiError {
    ApiError::invalid(
        at,
        format!(
            "the image is over the {} bytes this server accepts (--max-image-bytes): {bytes} \
             bytes or more",
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
    let mut reader = ImageReader::new(Cursor::new(&e.bytes))
        .with_guessed_format()
        .map_err(|err| bad(format!("cannot read the image: {err}")))?;
    // Reading the header may inflate metadata (a PNG's compressed colour profile): cap it,
    // or a tiny file could make the decoder allocate its default 512 MiB.
    let mut header_caps = Limits::default();
    header_caps.max_alloc = Some(HEADER_ALLOC);
    reader.limits(header_caps);
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
        rgb: over_white(decoded),
        detail: e.detail,
    })
}

/// RGB bytes of the image, a transparent one blended over white as the Python processors'
/// `convert_to_rgb` does (dropping alpha would turn transparent pixels black).
fn over_white(image: image::DynamicImage) -> Vec<u8> {
    if !image.color().has_alpha() {
        return image.into_rgb8().into_raw();
    }
    let rgba = image.into_rgba8();
    let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
    for p in rgba.pixels() {
        let a = u32::from(p.0[3]);
        for c in &p.0[..3] {
            // Rounded: (c a + 255 (255 - a)) / 255.
            out.push(((u32::from(*c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests;
