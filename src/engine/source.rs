//! Where a model's files come from: a local diffusers folder, the Hugging Face cache, or the hub.
//!
//! `--model` takes a folder or a repo id. A repo id is looked up in the standard cache
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, Python's layout) and
//! downloaded with `hf-hub` only when files are missing and `HF_HUB_OFFLINE` is not set. Either
//! way the result is a [`ModelFiles`]: the paths of every config, weight file and the tokenizer.

use std::path::{Path, PathBuf};

use super::error::{Error, Result};

/// The model of the paper: every published pix2pix-zero result uses Stable Diffusion 1.4.
pub const DEFAULT_MODEL: &str = "CompVis/stable-diffusion-v1-4";

/// The weight files each component may have, in order of preference (full precision first).
const UNET_WEIGHTS: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];
const TEXT_WEIGHTS: [&str; 2] = ["model.safetensors", "model.fp16.safetensors"];
const TOKENIZER_FILES: [&str; 5] = [
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.json",
];

/// Paths of everything a Stable Diffusion model consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The folder the files were found in (a cache snapshot for repo ids).
    pub root: PathBuf,
    /// What the user asked for: a folder path or a repo id.
    pub origin: String,
    /// `model_index.json`, when the folder has one.
    pub model_index: Option<PathBuf>,
    /// `unet/config.json` and its safetensors.
    pub unet: (PathBuf, PathBuf),
    /// `vae/config.json` and its safetensors.
    pub vae: (PathBuf, PathBuf),
    /// `text_encoder/config.json` and its safetensors.
    pub text_encoder: (PathBuf, PathBuf),
    /// The `tokenizer/` folder.
    pub tokenizer: PathBuf,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: PathBuf,
}

/// Reports download progress: `done` of `total` bytes of `file`.
pub trait DownloadProgress {
    /// Called when a file starts, as bytes arrive, and when it ends (`done == total`).
    fn progress(&mut self, file: &str, done: u64, total: u64);
}

/// Discards progress.
impl DownloadProgress for () {
    fn progress(&mut self, _: &str, _: u64, _: u64) {}
}

/// How to resolve a repo id.
#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// The cache folder (`models--owner--name/...` inside).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Prefer `*.fp16.safetensors` when downloading (half the download; computed in f32 anyway).
    pub prefer_fp16_download: bool,
}

impl ResolveOptions {
    /// Options from the environment, as Python's `huggingface_hub` reads it.
    pub fn from_env() -> Self {
        Self {
            cache_dir: hf_cache_dir(),
            offline: env_flag("HF_HUB_OFFLINE"),
            prefer_fp16_download: false,
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// This program's own cache folder: `$XDG_CACHE_HOME/pix2pix-zero`, else
/// `~/.cache/pix2pix-zero` (under the system's temporary folder when there is no home).
pub fn cache_home() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("pix2pix-zero")
}

/// The Hugging Face hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `spec` reads as a repo id (`owner/name`) rather than a path.
fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The first of `names` that exists in `dir`.
fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// A weight file of `component`, with a message naming the fix when there is none.
fn weights(root: &Path, component: &str, names: &[&str]) -> Result<PathBuf> {
    let dir = root.join(component);
    if let Some(path) = first_existing(&dir, names) {
        return Ok(path);
    }
    let has_bin = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "bin"))
        })
        .unwrap_or(false);
    let hint = if has_bin {
        format!(
            "only PyTorch .bin weights are in `{}`; save the model with safetensors \
             (diffusers' save_pretrained(..., safe_serialization=True)) and load that folder",
            dir.display()
        )
    } else {
        format!(
            "expected one of {} in `{}`",
            names.join(", "),
            dir.display()
        )
    };
    Err(Error::MissingFile {
        path: dir.join(names[0]),
        hint,
    })
}

fn required(path: PathBuf, hint: &str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingFile {
            path,
            hint: hint.to_string(),
        })
    }
}

/// The files of a local diffusers-format folder.
pub fn from_folder(root: &Path, origin: &str) -> Result<ModelFiles> {
    if !root.is_dir() {
        return Err(Error::MissingFolder(root.to_path_buf()));
    }
    let component_hint = "a diffusers Stable Diffusion folder has unet/, vae/, text_encoder/, \
                          tokenizer/ and scheduler/; download the whole model or pass the right folder";
    for component in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        required(root.join(component), component_hint)?;
    }
    let index = root.join("model_index.json");
    Ok(ModelFiles {
        root: root.to_path_buf(),
        origin: origin.to_string(),
        model_index: index.is_file().then_some(index),
        unet: (
            required(root.join("unet/config.json"), component_hint)?,
            weights(root, "unet", &UNET_WEIGHTS)?,
        ),
        vae: (
            required(root.join("vae/config.json"), component_hint)?,
            weights(root, "vae", &UNET_WEIGHTS)?,
        ),
        text_encoder: (
            required(root.join("text_encoder/config.json"), component_hint)?,
            weights(root, "text_encoder", &TEXT_WEIGHTS)?,
        ),
        tokenizer: root.join("tokenizer"),
        scheduler: required(root.join("scheduler/scheduler_config.json"), component_hint)?,
    })
}

/// The snapshot folder of `repo` in the cache: the one `refs/main` names, else the newest.
pub fn cached_snapshot(cache_dir: &Path, repo: &str) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let dir = snapshots.join(commit.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Resolves `--model`: an existing path is a folder; `owner/name` is a repo id, looked up in the
/// cache and downloaded when missing (unless offline).
pub fn resolve(
    spec: &str,
    options: &ResolveOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.exists() || !looks_like_repo_id(spec) {
        return from_folder(path, spec);
    }
    if let Some(snapshot) = cached_snapshot(&options.cache_dir, spec) {
        if let Ok(files) = from_folder(&snapshot, spec) {
            return Ok(files);
        }
    }
    if options.offline {
        return Err(Error::NotCached {
            repo: spec.to_string(),
            looked_in: options.cache_dir.display().to_string(),
        });
    }
    download(spec, options, progress)?;
    let snapshot = cached_snapshot(&options.cache_dir, spec).ok_or_else(|| Error::Download {
        repo: spec.to_string(),
        file: "model_index.json".into(),
        message: "the download left no snapshot in the cache".into(),
    })?;
    from_folder(&snapshot, spec)
}

/// Resolves a model that is a flat set of files (e.g. BLIP): a folder holding `required`, or a
/// repo id found in the cache or downloaded (with `optional` files when the repo has them).
pub fn resolve_files(
    spec: &str,
    required: &[&str],
    optional: &[&str],
    options: &ResolveOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf> {
    let complete = |dir: &Path| required.iter().all(|f| dir.join(f).is_file());
    let path = Path::new(spec);
    if path.exists() || !looks_like_repo_id(spec) {
        if !path.is_dir() {
            return Err(Error::MissingFolder(path.to_path_buf()));
        }
        if let Some(missing) = required.iter().find(|f| !path.join(f).is_file()) {
            return Err(Error::MissingFile {
                path: path.join(missing),
                hint: format!("the folder needs {}", required.join(", ")),
            });
        }
        return Ok(path.to_path_buf());
    }
    if let Some(snapshot) = cached_snapshot(&options.cache_dir, spec).filter(|s| complete(s)) {
        return Ok(snapshot);
    }
    if options.offline {
        return Err(Error::NotCached {
            repo: spec.to_string(),
            looked_in: options.cache_dir.display().to_string(),
        });
    }
    let hub = Hub::open(spec, options)?;
    let wanted = required
        .iter()
        .chain(
            optional
                .iter()
                .filter(|f| hub.listing.iter().any(|l| l == *f)),
        )
        .map(|f| f.to_string());
    hub.fetch(wanted, progress)?;
    cached_snapshot(&options.cache_dir, spec)
        .filter(|s| complete(s))
        .ok_or_else(|| Error::Download {
            repo: spec.to_string(),
            file: required[0].to_string(),
            message: "the download left no complete snapshot in the cache".into(),
        })
}

/// Adapts our progress reporting to hf-hub's.
struct HubProgress<'a> {
    inner: &'a mut dyn DownloadProgress,
    file: String,
    done: u64,
    total: u64,
}

impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.inner.progress(&self.file, 0, self.total);
    }
    fn update(&mut self, size: usize) {
        self.done += size as u64;
        self.inner.progress(&self.file, self.done, self.total);
    }
    fn finish(&mut self) {
        self.inner.progress(&self.file, self.total, self.total);
    }
}

/// The files of a Stable Diffusion repo to download, chosen from its listing.
fn files_to_download(listing: &[String], prefer_fp16: bool) -> Vec<String> {
    let has = |f: &str| listing.iter().any(|l| l == f);
    let mut files: Vec<String> = [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ]
    .iter()
    .map(|f| f.to_string())
    .collect();
    files.extend(
        TOKENIZER_FILES
            .iter()
            .map(|f| format!("tokenizer/{f}"))
            .filter(|f| has(f)),
    );
    for (component, names) in [
        ("unet", UNET_WEIGHTS),
        ("vae", UNET_WEIGHTS),
        ("text_encoder", TEXT_WEIGHTS),
    ] {
        let mut order: Vec<&str> = names.to_vec();
        if prefer_fp16 {
            order.reverse();
        }
        if let Some(name) = order
            .iter()
            .map(|n| format!("{component}/{n}"))
            .find(|f| has(f))
        {
            files.push(name);
        }
    }
    files
}

/// A repo on the hub: its client and its file listing.
struct Hub {
    repo: String,
    remote: hf_hub::api::sync::ApiRepo,
    listing: Vec<String>,
}

impl Hub {
    fn error(&self, file: &str, e: &dyn std::fmt::Display) -> Error {
        Error::Download {
            repo: self.repo.clone(),
            file: file.to_string(),
            message: e.to_string(),
        }
    }

    /// Connects and lists the repo's files.
    fn open(repo: &str, options: &ResolveOptions) -> Result<Self> {
        let fail = |file: &str, e: &dyn std::fmt::Display| Error::Download {
            repo: repo.to_string(),
            file: file.to_string(),
            message: e.to_string(),
        };
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_cache_dir(options.cache_dir.clone())
            .with_progress(false)
            .build()
            .map_err(|e| fail("(api)", &e))?;
        let remote = api.model(repo.to_string());
        let listing = remote
            .info()
            .map_err(|e| fail("(listing)", &e))?
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .collect();
        Ok(Self {
            repo: repo.to_string(),
            remote,
            listing,
        })
    }

    /// Downloads `files` into the cache, reporting progress.
    fn fetch(
        &self,
        files: impl IntoIterator<Item = String>,
        progress: &mut dyn DownloadProgress,
    ) -> Result<()> {
        for file in files {
            let reporter = HubProgress {
                inner: progress,
                file: file.clone(),
                done: 0,
                total: 0,
            };
            self.remote
                .download_with_progress(&file, reporter)
                .map_err(|e| self.error(&file, &e))?;
        }
        Ok(())
    }
}

/// Downloads what a Stable Diffusion model needs into the cache.
fn download(
    repo: &str,
    options: &ResolveOptions,
    progress: &mut dyn DownloadProgress,
) -> Result<()> {
    let hub = Hub::open(repo, options)?;
    let files = files_to_download(&hub.listing, options.prefer_fp16_download);
    hub.fetch(files, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("CompVis/stable-diffusion-v1-4"));
        assert!(looks_like_repo_id("stabilityai/stable-diffusion-2-1-base"));
        assert!(!looks_like_repo_id("./models/sd"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("models"));
        assert!(!looks_like_repo_id("a/b/c"));
    }

    #[test]
    fn download_prefers_full_precision_unless_asked() {
        let listing: Vec<String> = [
            "model_index.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let files = files_to_download(&listing, false);
        assert!(files.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(files.contains(&"vae/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(files.contains(&"tokenizer/merges.txt".to_string()));
        assert!(!files.iter().any(|f| f.ends_with("tokenizer.json")));
        let fp16 = files_to_download(&listing, true);
        assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(fp16.contains(&"text_encoder/model.safetensors".to_string()));
    }
}
