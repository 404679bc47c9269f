//! `p2pz gui`: the desktop editor, with options for scripted starts (screenshots, demos).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

/// Arguments of `p2pz gui`.
#[derive(Debug, Default, Args)]
pub struct GuiArgs {
    /// A photo to open.
    image: Option<PathBuf>,
    /// A model folder or repo id (default: the last one used, else CompVis/stable-diffusion-v1-4).
    /// Only local folders and the Hugging Face cache are looked at; the Model panel offers the
    /// download.
    #[arg(long)]
    model: Option<String>,
    /// The BLIP captioner: a folder or a repo id.
    #[arg(long)]
    captioner: Option<String>,
    /// Use this caption instead of BLIP's.
    #[arg(long)]
    caption: Option<String>,
    /// The word in the photo.
    #[arg(long = "from")]
    from: Option<String>,
    /// The word it should become.
    #[arg(long = "to")]
    to: Option<String>,
    /// DDIM steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Working long side, a multiple of 64 (default: the model's own size).
    #[arg(long)]
    size: Option<usize>,
    /// Sentences per word for the edit direction (default 1000).
    #[arg(long)]
    sentences: Option<usize>,
    /// Run the edit as soon as the photo, caption and model are ready.
    #[arg(long)]
    run: bool,
    /// Show the overlay of this caption token (e.g. cat).
    #[arg(long)]
    overlay_token: Option<String>,
    /// Which pass the overlay shows.
    #[arg(long, value_enum)]
    overlay_view: Option<ViewArg>,
    /// What the canvas shows.
    #[arg(long, value_enum)]
    compare: Option<CompareArg>,
    /// Light or dark theme.
    #[arg(long, value_enum)]
    theme: Option<ThemeArg>,
    /// Save a screenshot of the window here once it settles (after the edit with --run), then
    /// quit. Prints the UI frame time measured while the worker ran.
    #[arg(long)]
    screenshot: Option<PathBuf>,
    /// Write a JSON picture of the app's state (settings, job, result, messages, where the main
    /// widgets are) to this file whenever it changes, for scripted checks of the real window.
    #[arg(long)]
    state_dump: Option<PathBuf>,
    /// The window's size, e.g. 1280x720 (default: 1360x820, or the size it last had).
    #[arg(long, value_parser = parse_window)]
    window: Option<[f32; 2]>,
    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    cpu: bool,
    /// f32 (the default), or bf16 for bf16 matrix products on CPUs with AMX (2–3× faster
    /// edits, less exact; the Model panel says whether they are in use).
    #[arg(long, value_enum)]
    precision: Option<super::Precision>,
}

/// `--window WxH`.
fn parse_window(text: &str) -> Result<[f32; 2], String> {
    let parsed = text
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some([w.trim().parse().ok()?, h.trim().parse().ok()?]));
    match parsed {
        Some([w, h]) if w >= 320.0 && h >= 240.0 => Ok([w, h]),
        _ => Err(format!(
            "`{text}` is not a window size: give width x height, e.g. 1280x720 (at least 320x240)"
        )),
    }
}

/// `--overlay-view`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ViewArg {
    Reference,
    Edited,
    Difference,
}

/// `--compare`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompareArg {
    Edited,
    Original,
    Split,
    Reconstruction,
}

/// `--theme`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ThemeArg {
    Dark,
    Light,
}

/// Runs `p2pz gui` in a build without the desktop editor: says how to get one.
#[cfg(not(feature = "gui"))]
pub fn run(_: GuiArgs) -> Result<()> {
    anyhow::bail!(
        "this p2pz was built without the desktop editor (cargo feature `gui`, on by default): \
         use the command-line stages (`p2pz edit --help`), or build again without \
         --no-default-features"
    )
}

/// Runs `p2pz gui`.
#[cfg(feature = "gui")]
pub fn run(args: GuiArgs) -> Result<()> {
    use pix2pix_zero::app::heatmap::MapView;
    use pix2pix_zero::app::state::{CompareMode, ThemeChoice};
    use pix2pix_zero::app::{self, AppOptions};
    use pix2pix_zero::worker::WorkerConfig;

    let mut worker = WorkerConfig::for_user(args.cpu);
    match args.precision {
        None | Some(super::Precision::F32) => {}
        Some(super::Precision::Bf16) => worker.bf16_products = true,
        Some(super::Precision::F16) => anyhow::bail!(
            "the editor computes in f32: use --precision f32, or bf16 for bf16 products on CPUs              with AMX"
        ),
    }
    if let Some(captioner) = args.captioner {
        worker.captioner = captioner;
    }
    if let Some(sentences) = args.sentences {
        worker.sentences = sentences;
    }
    let mut options = AppOptions::new(worker);
    options.image = args.image;
    options.model = args.model;
    options.caption = args.caption;
    options.from = args.from;
    options.to = args.to;
    options.steps = args.steps;
    options.size = args.size;
    options.run = args.run;
    options.overlay_token = args.overlay_token;
    options.overlay_view = args.overlay_view.map(|v| match v {
        ViewArg::Reference => MapView::Reference,
        ViewArg::Edited => MapView::Edited,
        ViewArg::Difference => MapView::Difference,
    });
    options.compare = args.compare.map(|c| match c {
        CompareArg::Edited => CompareMode::Edited,
        CompareArg::Original => CompareMode::Original,
        CompareArg::Split => CompareMode::Split(0.5),
        CompareArg::Reconstruction => CompareMode::Reconstruction,
    });
    options.theme = args.theme.map(|t| match t {
        ThemeArg::Dark => ThemeChoice::Dark,
        ThemeArg::Light => ThemeChoice::Light,
    });
    options.screenshot = args.screenshot;
    options.state_dump = args.state_dump;
    options.window_size = args.window;
    app::run(options)
}
