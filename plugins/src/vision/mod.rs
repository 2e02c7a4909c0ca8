//! A vision tower for the default language model, trained here: the default model
//! (SmolLM2-135M) is the language model of SmolVLM-256M, but no pretrained vision weights can
//! be fetched, so `server train vision` trains a small SigLIP encoder and Idefics3 connector in
//! front of the frozen model on a seeded synthetic question set, and writes a folder that
//! `server serve --vision DIR` serves through `models::vision` (LLaVA's first stage: Liu et
//! al., "Visual instruction tuning", arXiv 2304.08485).
//!
//! - [`data`]: the synthetic images (shapes, colours, counts, sides, a written word) and their
//!   one-word questions, sample `i` of a split a function of the seed and `i`.
//! - [`tower`]: the encoder and connector with trainable weights, saved under Idefics3's names.
//! - [`prompt`]: conversations about an image rendered and tokenized as the server does.
//! - [`train`]: alignment to word embeddings, then answers through the frozen model.
//! - [`eval`]: held-out accuracy, teacher-forced through the training forward pass.
//! - [`served`]: questions answered by the serving forward pass, greedily, timed.
//! - [`files`]: the folder written.

pub mod data;
pub mod eval;
pub mod files;
pub mod prompt;
pub mod served;
pub mod tower;
pub mod train;
