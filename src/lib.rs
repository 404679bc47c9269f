//! pix2pix-zero: zero-shot image-to-image translation (Parmar et al., SIGGRAPH 2023) on Stable
//! Diffusion, in Rust with candle.
//!
//! - [`engine`]: Stable Diffusion 1.x/2.x with an attention-control seam, DDIM forward and
//!   inverse, and the latent-only gradient path. It knows nothing about editing.
//! - [`edit`]: the stages of the paper built on the engine.
//! - [`worker`]: the thread that owns the models; commands in, events out.
//! - `app`: the eframe desktop editor, which talks only to the worker (cargo feature `gui`, on by
//!   default).

#[cfg(feature = "gui")]
pub mod app;
pub mod distill;
pub mod edit;
pub mod engine;
pub mod export;
pub mod worker;
