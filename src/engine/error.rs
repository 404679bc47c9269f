//! The engine's error type: every message names the thing that is wrong and how to fix it.

use std::path::PathBuf;

/// What can go wrong while finding, loading or running a Stable Diffusion model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--model` points at a path that does not exist.
    #[error(
        "model folder `{0}` does not exist: pass --model with a diffusers-format folder \
         (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a Hugging Face repo id"
    )]
    MissingFolder(PathBuf),

    /// A component file the model needs is absent.
    #[error("`{path}` is missing: {hint}")]
    MissingFile {
        /// The file or folder that was looked for.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },

    /// A JSON config could not be read.
    #[error("cannot read `{path}`: {message}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What was wrong with it.
        message: String,
    },

    /// The model is not a Stable Diffusion 1.x/2.x-shaped model.
    #[error("unsupported model: {0}")]
    Unsupported(String),

    /// A weight file does not match its config (missing tensor, wrong shape, unreadable file).
    #[error("weights `{path}`: {message}")]
    Weights {
        /// The safetensors file.
        path: PathBuf,
        /// candle's description of the mismatch, with the fix.
        message: String,
    },

    /// A repo id is not in the local cache and may not be downloaded.
    #[error(
        "`{repo}` is not in the Hugging Face cache (looked in {looked_in}) and HF_HUB_OFFLINE is set: \
         unset HF_HUB_OFFLINE to download it, or pass --model with a local diffusers-format folder"
    )]
    NotCached {
        /// The repo id.
        repo: String,
        /// The cache folders that were searched.
        looked_in: String,
    },

    /// Downloading from the hub failed.
    #[error(
        "could not download `{file}` of `{repo}`: {message}. Check the network and the repo id, \
         or pass --model with a local diffusers-format folder"
    )]
    Download {
        /// The repo id.
        repo: String,
        /// The file within the repo.
        file: String,
        /// What the hub client said.
        message: String,
    },

    /// The tokenizer files are unusable.
    #[error("tokenizer `{path}`: {message}")]
    Tokenizer {
        /// The tokenizer folder or file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// An input tensor or parameter has the wrong shape or value.
    #[error("{0}")]
    Input(String),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
