//! The pix2pix-zero method, one stage a file, built on the [`engine`](crate::engine).

pub mod guidance;
