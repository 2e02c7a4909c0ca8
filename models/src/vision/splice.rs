//! Image features into the prompt: a hook at the embeddings point that replaces the embedding
//! of each image token with the connector's feature for it, as `Idefics3Model.inputs_merger`
//! does. The features travel in the row's parameters with the positions they go to, so any
//! prefill chunking puts each at its place and decode steps (no image tokens) pass untouched.

use candle_core::Tensor;

use crate::error::{ModelError, Result};
use crate::hooks::{Hook, HookGroup, HookPoints};

/// One sequence's image features and where they go.
#[derive(Debug, Clone)]
pub struct ImagePlacement {
    /// Positions of the prompt's image tokens, ascending.
    positions: Vec<u32>,
    /// `(positions, hidden)`: row `i` is the embedding at `positions[i]`.
    features: Tensor,
}

impl ImagePlacement {
    /// Features for the image tokens of `prompt`, in order: `features` must have one row per
    /// `image_token` in the prompt (the connector's output of every image, concatenated).
    pub fn for_prompt(prompt: &[u32], image_token: u32, features: Tensor) -> Result<Self> {
        let positions: Vec<u32> = (0u32..)
            .zip(prompt)
            .filter(|&(_, &t)| t == image_token)
            .map(|(p, _)| p)
            .collect();
        let rows = features.dim(0)?;
        if rows != positions.len() {
            return Err(hook_error(format!(
                "{rows} image features for {} image tokens in the prompt",
                positions.len()
            )));
        }
        Ok(Self {
            positions,
            features,
        })
    }
}

/// The embeddings hook of a vision-language model; rows carry an [`ImagePlacement`].
pub struct ImageSplice {
    image_token: u32,
}

impl ImageSplice {
    pub fn new(image_token: u32) -> Self {
        Self { image_token }
    }
}

impl Hook for ImageSplice {
    fn name(&self) -> &str {
        "image features"
    }

    fn points(&self) -> HookPoints {
        HookPoints {
            embeddings: true,
            ..HookPoints::default()
        }
    }

    /// `x`: `(group tokens, hidden)`. The rows at image positions are taken from the
    /// features, the rest from `x`, by one gather over `[x; features...]`.
    fn embeddings(&self, group: &HookGroup<'_>, x: &Tensor) -> Result<Option<Tensor>> {
        let mut sources = vec![x.clone()];
        let mut index: Vec<u32> = (0..group.len() as u32).collect();
        let (mut entry, mut next) = (0, group.len());
        for (row, &len) in group.rows.iter().zip(&group.lengths) {
            let placement = row
                .params
                .downcast_ref::<ImagePlacement>()
                .ok_or_else(|| hook_error("a row without image placement".into()))?;
            let range = row.positions();
            let at = |bound: usize| {
                placement
                    .positions
                    .partition_point(|&p| (p as usize) < bound)
            };
            let (lo, hi) = (at(range.start), at(range.end));
            for (k, &p) in placement.positions[lo..hi].iter().enumerate() {
                let i = p as usize - range.start;
                if row.tokens.get(i) != Some(&self.image_token) {
                    return Err(hook_error(format!(
                        "position {p} holds token {:?}, not the image token {}",
                        row.tokens.get(i),
                        self.image_token
                    )));
                }
                index[entry + i] = (next + k) as u32;
            }
            if hi > lo {
                sources.push(placement.features.narrow(0, lo, hi - lo)?);
                next += hi - lo;
            }
            entry += len;
        }
        if sources.len() == 1 {
            return Ok(None);
        }
        let all = Tensor::cat(&sources, 0)?;
        let index = Tensor::new(index, x.device())?;
        Ok(Some(all.index_select(&index, 0)?))
    }
}

fn hook_error(message: String) -> ModelError {
    ModelError::Hook {
        hook: "image features".into(),
        message,
    }
}
