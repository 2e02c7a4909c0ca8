//! Images into a vision-language model's prompt, as its processor does: each image part of a
//! message is rendered as a marker, the chat template runs on the text, then each marker
//! becomes the image's prompt tokens (`<fake_token_around_image><global-img><image>...`), and
//! the image features ride with the request to the embeddings hook that puts them at those
//! tokens ([`models::vision::ImageSplice`]). `usage.prompt_tokens` counts the image tokens.

use std::sync::Arc;

use models::vision::{ImagePlacement, ImageSplice, VisionModel};
use models::{Hook, HookCall};

use super::{on_image_thread, Image};
use crate::engine::{Engine, GenerateRequest};
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

/// A request's images for a vision-language model: first how they are laid out in the prompt
/// (checked by [`VisionPrompt::expand`] while the request is planned), then, once every cheap
/// check has passed, their features ([`VisionPrompt::encode`]) and the hook that places them.
pub struct VisionPrompt {
    model: Arc<VisionModel>,
    images: Vec<Image>,
}

impl VisionPrompt {
    /// `None` without images; a model without a vision tower refuses them by part.
    pub fn new(engine: &dyn Engine, images: Vec<Image>) -> Result<Option<Self>, ApiError> {
        let Some(first) = images.first() else {
            return Ok(None);
        };
        let Some(model) = engine.vision() else {
            return Err(text_only(engine, first.part.clone()));
        };
        Ok(Some(Self { model, images }))
    }

    /// `text` with each marker replaced by one image's prompt tokens.
    pub fn expand(&self, text: &str) -> Result<String, ApiError> {
        let markers = text.matches(IMAGE_MARKER).count();
        if markers != self.images.len() {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "the rendered prompt holds {markers} image places for {} images: the chat \
                     template must keep each message's text as it is",
                    self.images.len()
                ),
            ));
        }
        Ok(text.replace(IMAGE_MARKER, &self.model.image_prompt()))
    }

    /// The images' features by the vision tower (`(images * tokens_per_image, hidden)`), on a
    /// blocking thread, then a hook call that puts them at each request's image tokens, first
    /// in its chain.
    pub async fn encode(self, requests: &mut [GenerateRequest]) -> Result<(), ApiError> {
        let Self { model, images } = self;
        let tower = model.clone();
        let features = on_image_thread("image encoding", move || {
            let inputs: Vec<(&[u8], u32, u32)> = images
                .iter()
                .map(|i| (i.rgb.as_slice(), i.width, i.height))
                .collect();
            tower.features(&inputs)
        })
        .await?
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("image encoding failed: {e}")))?;
        let image_token = model.tower.config().image_token_id;
        let splice: Arc<dyn Hook> = Arc::new(ImageSplice::new(image_token));
        // The `n` choices of one prompt share one call, as they share the rest of their chain.
        let mut last: Option<(Vec<u32>, HookCall)> = None;
        for request in requests {
            let call = match &last {
                Some((prompt, call)) if *prompt == request.prompt => call.clone(),
                _ => {
                    let placement =
                        ImagePlacement::for_prompt(&request.prompt, image_token, features.clone())
                            .map_err(|e| {
                                ApiError::invalid(
                                    "messages",
                                    format!(
                                        "{e}: text that spells the model's image tokens cannot \
                                         be sent"
                                    ),
                                )
                            })?;
                    let call = HookCall::new(splice.clone(), Arc::new(placement));
                    last = Some((request.prompt.clone(), call.clone()));
                    call
                }
            };
            request.hooks.insert(0, call);
        }
        Ok(())
    }
}
