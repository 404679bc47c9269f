//! `p2pz pairs` and `p2pz merge-pairs`: training pairs for `p2pz distill`, on one machine or
//! fanned out over a cluster with `--shard i/N`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pix2pix_zero::distill::make::{make_pairs, PairProgress, PairSource};
use pix2pix_zero::distill::pairs::{
    holds_word, DirectionSpec, PairFolder, PairOrigin, PairSettings, Shard, DEFAULT_TEST_EVERY,
};
use pix2pix_zero::edit::direction::{self, fnv1a, EmbeddingCache, SentenceSource};
use pix2pix_zero::edit::image as photo;
use pix2pix_zero::edit::sentences::{self, DEFAULT_SENTENCES};
use pix2pix_zero::engine::{Error, StableDiffusion};

use super::editing::{cancel_on_ctrl_c, load_captioner, XA_REAL, XA_SYNTHETIC};
use super::{shown, ModelArgs};

/// Arguments of `p2pz pairs`.
#[derive(Debug, Args)]
pub struct PairsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The word in the source images (e.g. cat).
    #[arg(long = "from")]
    from: String,
    /// The word it becomes (e.g. dog).
    #[arg(long = "to")]
    to: String,
    /// Pairs in all (of every shard together).
    #[arg(long)]
    count: usize,
    /// The pairs folder (created when missing; an existing one is resumed or extended).
    #[arg(long)]
    out: PathBuf,
    /// Side of the square synthetic images, or the long side of photos; a multiple of 64.
    #[arg(long, default_value_t = photo::DEFAULT_WORKING_SIZE)]
    size: usize,
    /// DDIM steps of generation, inversion and editing.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// The run's seed: pair k's noise, caption and shifts come from (seed, k).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Make only the pairs k ≡ i (mod N): `--shard i/N`, e.g. from a SLURM array task.
    #[arg(long, value_parser = Shard::parse)]
    shard: Option<Shard>,
    /// Real photos to invert and edit instead of generated images (pair k is the k-th file by name).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Captions, one per line (pair k takes line k mod lines): for synthetic pairs they must
    /// hold the source word; for photos they replace BLIP.
    #[arg(long)]
    captions: Option<PathBuf>,
    /// The BLIP captioner for photos without --captions: a folder or a repo id.
    #[arg(long, default_value = pix2pix_zero::edit::caption::DEFAULT_CAPTIONER)]
    captioner: String,
    /// A precomputed direction instead of sentences about the two words.
    #[arg(long)]
    direction: Option<PathBuf>,
    /// Sentences per word for the direction.
    #[arg(long, default_value_t = DEFAULT_SENTENCES)]
    sentences: usize,
    /// Cross-attention guidance step λ_xa (default 0.15 synthetic, 0.1 photos, as the authors).
    #[arg(long)]
    xa: Option<f64>,
    /// Multiplier of the edit direction.
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// CFG scale.
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Hold out every N-th pair for the test split (0: none).
    #[arg(long, default_value_t = DEFAULT_TEST_EVERY)]
    test_every: usize,
}

/// Where a pair's source image comes from.
enum Sources {
    /// Captions for generated images.
    Captions(Vec<String>),
    /// The generator's captions, one per pair seed.
    Generated,
    /// Photos, with optional captions.
    Photos {
        files: Vec<PathBuf>,
        captions: Option<Vec<String>>,
        captioner: String,
    },
}

impl PairsArgs {
    fn settings(&self) -> Result<PairSettings> {
        let from = sentences::check_word(&self.from)?.to_string();
        let to = sentences::check_word(&self.to)?.to_string();
        if from.eq_ignore_ascii_case(&to) {
            bail!("--from and --to are both `{from}`: an edit needs two different words");
        }
        photo::working_size((1, 1), self.size)?;
        if self.steps < 3 {
            bail!(
                "--steps {} is too few: use at least 3 (50 is the paper's)",
                self.steps
            );
        }
        let origin = match &self.images {
            Some(folder) => PairOrigin::Photos {
                folder: folder.display().to_string(),
            },
            None => PairOrigin::Synthetic {
                captions_hash: match &self.captions {
                    Some(path) => Some(format!("{:016x}", fnv1a(&read(path)?))),
                    None => None,
                },
            },
        };
        let direction = match &self.direction {
            Some(path) => DirectionSpec::File {
                path: path.display().to_string(),
                hash: format!("{:016x}", fnv1a(&read(path)?)),
            },
            None => DirectionSpec::Words {
                sentences: self.sentences,
                seed: self.seed,
            },
        };
        Ok(PairSettings {
            model: self.model.model.clone(),
            lambda_xa: self.xa.unwrap_or(if self.images.is_some() {
                XA_REAL
            } else {
                XA_SYNTHETIC
            }),
            from,
            to,
            origin,
            direction,
            size: self.size,
            steps: self.steps,
            seed: self.seed,
            strength: self.strength,
            guidance_scale: self.guidance,
            test_every: self.test_every,
        })
    }

    fn sources(&self, from: &str) -> Result<Sources> {
        let captions = match &self.captions {
            Some(path) => Some(sentences::read_file(path)?),
            None => None,
        };
        Ok(match (&self.images, captions) {
            (Some(folder), captions) => Sources::Photos {
                files: photos_in(folder)?,
                captions,
                captioner: self.captioner.clone(),
            },
            (None, Some(captions)) => {
                if let Some((line, caption)) = captions
                    .iter()
                    .enumerate()
                    .find(|(_, c)| !holds_word(c, from))
                {
                    bail!(
                        "caption {} of --captions, \"{caption}\", does not hold the word `{from}`: \
                         every synthetic source image must show it",
                        line + 1
                    );
                }
                Sources::Captions(captions)
            }
            (None, None) => Sources::Generated,
        })
    }

    fn direction(&self, model: &StableDiffusion, settings: &PairSettings) -> Result<Tensor> {
        if let Some(path) = &self.direction {
            return Ok(direction::load_direction(path, model)?);
        }
        let cache = EmbeddingCache::default_location();
        let source = SentenceSource::Generated {
            count: self.sentences,
            seed: self.seed,
        };
        let mean = |word: &str| -> Result<Tensor> {
            Ok(cache.mean_embedding(model, word, &source.sentences(word)?)?)
        };
        Ok(direction::direction(
            &mean(&settings.from)?,
            &mean(&settings.to)?,
        )?)
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))
}

/// The photos of a folder, by file name.
fn photos_in(folder: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(folder)
        .with_context(|| format!("cannot read the --images folder `{}`", folder.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str())
            })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "the --images folder `{}` holds no PNG, JPEG or WebP photos",
            folder.display()
        );
    }
    Ok(files)
}

/// Runs `p2pz pairs`.
pub fn run(args: PairsArgs) -> Result<()> {
    if args.count == 0 {
        bail!("--count 0 makes no pairs: ask for at least one");
    }
    let settings = args.settings()?;
    let sources = args.sources(&settings.from)?;
    let shard = args.shard.unwrap_or(Shard::ALL);
    let count = match &sources {
        Sources::Photos { files, .. } if files.len() < args.count => {
            eprintln!(
                "note: --images holds {} photos, so {} pairs are made, not {}",
                files.len(),
                files.len(),
                args.count
            );
            files.len()
        }
        _ => args.count,
    };
    let folder = PairFolder::create(&args.out)?;
    folder.check_settings(&settings)?;
    let todo: Vec<usize> = shard
        .pairs(count)
        .filter(|&k| !folder.is_done(&settings, k))
        .collect();
    let mine = shard.pairs(count).count();
    eprintln!(
        "{} of this shard's {mine} pairs are to make in {} ({} already there)",
        todo.len(),
        shown(&args.out).display(),
        mine - todo.len()
    );
    if !todo.is_empty() {
        make(&args, &settings, &sources, &folder, &todo)?;
    }
    let indexed = folder.write_index()?;
    eprintln!("{indexed} pairs in {}", shown(&args.out).display());
    Ok(())
}

/// Makes the pairs `todo`, stopping cleanly on Ctrl-C.
fn make(
    args: &PairsArgs,
    settings: &PairSettings,
    sources: &Sources,
    folder: &PairFolder,
    todo: &[usize],
) -> Result<()> {
    let model = args.model.load()?;
    let cancel = cancel_on_ctrl_c();
    let direction = args.direction(&model, settings)?;
    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>24} [{bar:30}] {pos}/{len} pairs, {per_sec}, {elapsed} elapsed, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut captioner = None;
    let mut source = |k: usize, seed: u64| -> pix2pix_zero::engine::Result<PairSource> {
        Ok(match sources {
            Sources::Photos {
                files,
                captions,
                captioner: spec,
            } => {
                let image = photo::load(&files[k], settings.size)?;
                let caption = match captions {
                    Some(lines) => lines[k % lines.len()].clone(),
                    None => {
                        if captioner.is_none() {
                            captioner = Some(
                                load_captioner(spec, &model.device)
                                    .map_err(|e| Error::Input(format!("{e:#}")))?,
                            );
                        }
                        captioner
                            .as_mut()
                            .expect("just loaded")
                            .caption(&image.pixels)?
                    }
                };
                let name = files[k]
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                PairSource::Photo {
                    image: image.pixels,
                    hash: image.hash,
                    caption,
                    name,
                }
            }
            Sources::Captions(lines) => PairSource::Caption(lines[k % lines.len()].clone()),
            Sources::Generated => {
                PairSource::Caption(sentences::generate(&settings.from, 1, seed)?.remove(0))
            }
        })
    };
    let started = Instant::now();
    let result = make_pairs(
        &model,
        settings,
        folder,
        todo,
        &direction,
        &mut source,
        &mut |p: PairProgress| {
            bar.set_position(p.done as u64);
            bar.set_message(format!(
                "pair {}: {} {}/{}",
                p.pair, p.step.stage, p.step.step, p.step.total
            ));
        },
        &cancel,
    );
    match result {
        Ok(()) => {
            bar.finish();
            eprintln!(
                "made {} pairs in {:.1} s",
                todo.len(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(Error::Cancelled) => {
            bar.abandon();
            folder.write_index()?;
            bail!("stopped; the same command resumes where it stopped")
        }
        Err(e) => Err(e.into()),
    }
}

/// Arguments of `p2pz merge-pairs`.
#[derive(Debug, Args)]
pub struct MergePairsArgs {
    /// Pairs folders to merge (e.g. one per shard).
    #[arg(required = true)]
    folders: Vec<PathBuf>,
    /// The merged folder (created when missing; may be one of the inputs' parent, not an input).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `p2pz merge-pairs`.
pub fn run_merge(args: MergePairsArgs) -> Result<()> {
    let target = PairFolder::create(&args.out)?;
    for dir in &args.folders {
        if pix2pix_zero::export::same_file(dir, &args.out) {
            bail!("`{}` is both an input and --out", dir.display());
        }
        let copied = target.merge_from(&PairFolder::open(dir)?)?;
        eprintln!("{copied} pairs from {}", shown(dir).display());
    }
    let indexed = target.write_index()?;
    eprintln!("{indexed} pairs in {}", shown(&args.out).display());
    Ok(())
}
