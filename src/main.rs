//! `p2pz`: the pix2pix-zero command line.

mod cli;

use clap::{Parser, Subcommand};

// mimalloc measurably helps candle, which allocates a fresh buffer for every op.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Zero-shot image-to-image translation (pix2pix-zero) on Stable Diffusion.
#[derive(Debug, Parser)]
#[command(name = "p2pz", version, about)]
struct Cli {
    /// Without a subcommand, the editor window opens.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open the desktop editor (the default without a subcommand).
    Gui(cli::gui::GuiArgs),
    /// Show what a model folder holds: components, dtypes, parameters, attention layers.
    Info(cli::info::InfoArgs),
    /// Generate an image from a prompt.
    Generate(cli::generate::GenerateArgs),
    /// Caption a photo with BLIP (beam search, as the authors decode it).
    Caption(cli::editing::CaptionCommand),
    /// Compute an edit direction from sentences about two words.
    Direction(cli::editing::DirectionArgs),
    /// Invert a photo (DDIM inversion with noise regularization) into a session file.
    Invert(cli::editing::InvertCommand),
    /// Edit a photo (or a generated image) from one word to another.
    Edit(cli::editing::EditCommand),
    /// Make training pairs of one edit for `p2pz distill` (deterministic; `--shard i/N` splits
    /// the work over machines).
    Pairs(cli::pairs::PairsArgs),
    /// Merge pairs folders (e.g. one per shard) into one.
    MergePairs(cli::pairs::MergePairsArgs),
    /// Train a fast generator on a pairs folder: the edit distilled, instant on any photo.
    Distill(cli::distill::DistillArgs),
    /// Edit a photo with a distilled generator (milliseconds instead of minutes).
    Apply(cli::distill::ApplyArgs),
    /// Time the UNet and VAE on a full-size SD-1.5 architecture with random weights.
    Bench(cli::bench::BenchArgs),
    /// Check this machine: devices, CPU features, parity of the UNet and the guidance gradient
    /// against reference tensors, and the time of one full-size UNet step. Needs no download.
    Doctor(cli::doctor::DoctorArgs),
}

fn main() -> std::process::ExitCode {
    pix2pix_zero::engine::cpu::candle_pool::spin_briefly();
    pix2pix_zero::engine::cpu::allocator::keep_freed_memory();
    let command = Cli::parse()
        .command
        .unwrap_or_else(|| Command::Gui(cli::gui::GuiArgs::default()));
    let result = match command {
        Command::Gui(args) => cli::gui::run(args),
        Command::Info(args) => cli::info::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Doctor(args) => cli::doctor::run(args),
        Command::Caption(args) => cli::editing::run_caption(args),
        Command::Direction(args) => cli::editing::run_direction(args),
        Command::Invert(args) => cli::editing::run_invert(args),
        Command::Edit(args) => cli::editing::run_edit(args),
        Command::Pairs(args) => cli::pairs::run(args),
        Command::MergePairs(args) => cli::pairs::run_merge(args),
        Command::Distill(args) => cli::distill::run_distill(args),
        Command::Apply(args) => cli::distill::run_apply(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole chain of causes on one line, without a backtrace.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
