//! Images into a vision-language model's prompt, as its processor does: each image part of a
//! message is rendered as a marker, the chat template runs on the text, then each marker
//! becomes the image's prompt tokens (`<fake_token_around_image><global-img><image>...`), and
//! the image features ride with the request to the embeddings hook that puts them at those
//! tokens ([`models::vision::ImageSplice`]). `usage.prompt_tokens` counts the image tokens.

use std::sync::Arc;

use candle_core::Tensor;
use models::vision::{ImagePlacement, ImageSplice, VisionModel};
use models::HookCall;

use super::{on_image_thread, Image};
use crate::engine::Engine;
use crate::http::error::{ApiError, ErrorKind};

/// What an image part becomes in a message's text before the template runs: a character of
/// Unicode's private use area that no tokenizer gives meaning to, so user text cannot forge it
/// by accident and the count check below catches it if it does.
pub const IMAGE_MARKER: &str = "\u{E000}";

/// The 400 of an image sent to a model without a vision tower, naming the part.
pub fn text_only(engine: &dyn Engine, part: String) -> ApiError {
    ApiError::invalid(
        part,
        format!(
            "model `{}` reads text only: it cannot take images",
            engine.info().id
        ),
    )
}

/// A request's images, encoded by the model's vision tower.
pub struct VisionPrompt {
    model: Arc<VisionModel>,
    /// `(images * tokens_per_image, hidden)`.
    features: Tensor,
    images: usize,
}

impl VisionPrompt {
    /// Encodes `images` (none: `None`); a model without a vision tower refuses them by part.
    pub async fn encode(engine: &dyn Engine, images: Vec<Image>) -> Result<Option<Self>, ApiError> {
        let Some(first) = images.first() else {
            return Ok(None);
        };
        let Some(model) = engine.vision() else {
            return Err(text_only(engine, first.part.clone()));
        };
        let tower = model.clone();
        let count = images.len();
        let features = on_image_thread("image encoding", move || {
            let inputs: Vec<(&[u8], u32, u32)> = images
                .iter()
                .map(|i| (i.rgb.as_slice(), i.width, i.height))
                .collect();
            tower.features(&inputs)
        })
        .await?
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("image encoding failed: {e}")))?;
        Ok(Some(Self {
            model,
            features,
            images: count,
        }))
    }

    /// `text` with each marker replaced by one image's prompt tokens.
    pub fn expand(&self, text: &str) -> Result<String, ApiError> {
        let markers = text.matches(IMAGE_MARKER).count();
        if markers != self.images {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "the rendered prompt holds {markers} image places for {} images: the chat \
                     template must keep each message's text as it is",
                    self.images
                ),
            ));
        }
        Ok(text.replace(IMAGE_MARKER, &self.model.image_prompt()))
    }

    /// The hook call that puts the features at `prompt`'s image tokens, first in the chain.
    pub fn hook(&self, prompt: &[u32]) -> Result<HookCall, ApiError> {
        let image_token = self.model.tower.config().image_token_id;
        let placement = ImagePlacement::for_prompt(prompt, image_token, self.features.clone())
            .map_err(|e| {
                ApiError::invalid(
                    "messages",
                    format!("{e}: text that spells the model's image tokens cannot be sent"),
                )
            })?;
        Ok(HookCall::new(
            Arc::new(ImageSplice::new(image_token)),
            Arc::new(placement),
        ))
    }
}
