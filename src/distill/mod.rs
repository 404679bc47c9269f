//! Distillation, the paper's fourth contribution: one edit (cat → dog) taught to a small
//! conditional generator that then makes it in milliseconds on any photo.
//!
//! - [`pairs`]: the training pairs' folder: deterministic, shardable, resumable;
//! - [`teacher`]: one pair from the diffusion editor, and [`make`]: the loop that makes a shard;
//! - [`depthwise`]: the generator's depthwise 3×3 convolution, a CPU kernel with its gradients;
//! - [`generator`]: the generator (what `p2pz apply` and the app's Instant run);
//! - [`discriminator`]: the PatchGAN critic;
//! - [`losses`]: L1, perceptual and adversarial;
//! - [`train`]: the training loop;
//! - [`file`]: generator files (weights and a header saying what they do);
//! - [`params`]: seeded trainable parameters.

pub mod depthwise;
pub mod discriminator;
pub mod file;
pub mod generator;
pub mod losses;
pub mod make;
pub mod pairs;
pub mod params;
pub mod teacher;
pub mod train;
