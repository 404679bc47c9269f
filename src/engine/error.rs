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

    /// The user cancelled a long computation.
    #[error("cancelled")]
    Cancelled,

    /// A tensor operation failed.
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set: users get
/// the cause, not 30 frames of candle internals.
pub fn candle_message(error: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match error {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => other.to_string(),
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
