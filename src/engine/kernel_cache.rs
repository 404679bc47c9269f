//! Kernels prepared at load time, kept on disk so that the next load maps them instead of
//! preparing them again.
//!
//! Winograd's transformed kernels ([`crate::engine::cpu`]) are 16/9 the size of the plain ones:
//! 1.1 GB for SD-1.5's UNet. Computing them takes little; filling that much fresh memory is what
//! costs, because every new page is zeroed (and, in a virtual machine, first backed by the host).
//! So the first load of a model file writes each transformed kernel to a file of its own under
//! the cache folder, and later loads map those files read-only: their pages are the page cache's,
//! already in memory, and nothing is zeroed or copied.
//!
//! An entry is used only if its header matches the model file's size, modification time and (on
//! Unix) inode and status-change time, the tensor's size and this version of the format; anything
//! else is prepared again and rewritten. Entries are written to a temporary file, synced and renamed, so a crash or a second process
//! never leaves a torn entry in place. The folder is `kernels` in
//! [`cache_home`](super::source::cache_home) (`~/.cache/pix2pix-zero/kernels`), or
//! `$P2PZ_KERNEL_CACHE`; `P2PZ_KERNEL_CACHE=off` turns the cache off. Deleting the folder is
//! always safe.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use memmap2::Mmap;

use super::weights::MappedF32;

/// First bytes of every entry.
const MAGIC: &[u8; 8] = b"p2pzkrn\0";

/// Raised whenever what an entry holds for the same source changes (a transform's arithmetic,
/// the layout): older entries are then prepared again.
const FORMAT_VERSION: u32 = 1;

/// Bytes before an entry's values (a multiple of 64, so the values stay aligned).
const HEADER_LEN: usize = 128;

/// The environment variable that moves the cache's folder, or turns it off with `off`.
pub const CACHE_DIR_VAR: &str = "P2PZ_KERNEL_CACHE";

/// What a cached kernel was prepared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelForm {
    /// Winograd's F(2×2, 3×3) transform of a 3×3 kernel, `(16, c_out, c_in)` f32.
    Winograd,
}

impl KernelForm {
    fn code(self) -> u32 {
        match self {
            Self::Winograd => 1,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Winograd => "winograd",
        }
    }
}

/// The folder that holds the cache's entries, or `None` when it is turned off.
pub fn default_root() -> Option<PathBuf> {
    root_from(std::env::var_os(CACHE_DIR_VAR), super::source::cache_home())
}

/// How many bytes the entries under `root` take (0 when there is nothing there yet).
pub fn bytes_under(root: &Path) -> u64 {
    let files_in = |dir: &Path| -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(dir)
            .map(|entries| entries.flatten().collect())
            .unwrap_or_default()
    };
    files_in(root)
        .iter()
        .flat_map(|model| files_in(&model.path()))
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}

/// [`default_root`] given the variable's value and this program's cache folder.
fn root_from(variable: Option<OsString>, cache_home: PathBuf) -> Option<PathBuf> {
    match variable {
        Some(value) if value == "off" => None,
        Some(value) if !value.is_empty() => Some(PathBuf::from(value)),
        _ => Some(cache_home.join("kernels")),
    }
}

/// What identifies a model file's contents without reading them: its size and modification
/// time, and on Unix its inode and status-change time, which no copy tool sets back (a file
/// replaced by another of the same size and copied timestamps still gets a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SourceStamp {
    len: u64,
    modified_secs: u64,
    modified_nanos: u32,
    /// The inode and the status-change time (seconds, nanoseconds); 0 where there are none.
    inode: u64,
    changed: (i64, i64),
}

impl SourceStamp {
    fn of(path: &Path) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        let modified = metadata.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        #[cfg(unix)]
        let (inode, changed) = {
            use std::os::unix::fs::MetadataExt;
            (metadata.ino(), (metadata.ctime(), metadata.ctime_nsec()))
        };
        #[cfg(not(unix))]
        let (inode, changed) = (0, (0, 0));
        Some(Self {
            len: metadata.len(),
            modified_secs: modified.as_secs(),
            modified_nanos: modified.subsec_nanos(),
            inode,
            changed,
        })
    }
}

/// The cache's entries for the kernels of one model file.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
    source: PathBuf,
    stamp: SourceStamp,
}

impl KernelCache {
    /// The entries of `model_file` under `root`, or `None` when the file's size or modification
    /// time can't be read. Nothing is created until an entry is stored.
    pub fn for_file(root: &Path, model_file: &Path) -> Option<Self> {
        let source = std::fs::canonicalize(model_file).ok()?;
        let stamp = SourceStamp::of(&source)?;
        let readable: Vec<String> = source
            .with_extension("")
            .iter()
            .rev()
            .take(2)
            .map(|part| safe_file_name(&part.to_string_lossy()))
            .collect();
        let name = format!(
            "{:016x}-{}",
            fnv1a(source.as_os_str().as_encoded_bytes()),
            readable.into_iter().rev().collect::<Vec<_>>().join("-")
        );
        Some(Self {
            dir: root.join(name),
            source,
            stamp,
        })
    }

    /// The entry of tensor `name` prepared as `form`.
    pub fn entry(&self, name: &str, form: KernelForm) -> CachedKernel {
        CachedKernel {
            path: self
                .dir
                .join(format!("{}.{}", safe_file_name(name), form.extension())),
            cache: self.clone(),
            form,
        }
    }
}

/// One kernel's place in the cache.
#[derive(Debug, Clone)]
pub struct CachedKernel {
    path: PathBuf,
    cache: KernelCache,
    form: KernelForm,
}

impl CachedKernel {
    /// The `len` values stored for this kernel, mapped read-only, if the entry exists and was
    /// prepared from the model file as it is now, in this format.
    pub fn load(&self, len: usize) -> Option<MappedF32> {
        let mut file = File::open(&self.path).ok()?;
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header).ok()?;
        let expected_len = (HEADER_LEN + len.checked_mul(4)?) as u64;
        if header != self.header(len) || file.metadata().ok()?.len() != expected_len {
            return None;
        }
        // SAFETY: read-only and private; like the model file's own mapping, it trusts the entry
        // not to be cut short while it is in use (entries are only ever replaced by a rename,
        // which leaves this mapping's file as it is).
        let map = unsafe { Mmap::map(&file) }.ok()?;
        MappedF32::in_mapping(Arc::new(map), HEADER_LEN, len)
    }

    /// Writes `values` as this kernel's entry (to a temporary file, synced, then renamed over
    /// any older one) and maps it back, so the caller can use the page cache's copy and free its
    /// own.
    pub fn store(&self, values: &[f32]) -> std::io::Result<MappedF32> {
        if !cfg!(target_endian = "little") {
            return Err(std::io::Error::other(
                "kernel cache: not a little-endian target",
            ));
        }
        let dir = &self.cache.dir;
        std::fs::create_dir_all(dir)?;
        let source_note = dir.join("source.txt");
        if !source_note.exists() {
            // Only for a person looking at the folder; losing a race to write it is harmless.
            let _ = std::fs::write(&source_note, format!("{}\n", self.cache.source.display()));
        }
        static TEMPORARIES: AtomicU64 = AtomicU64::new(0);
        let temporary = dir.join(format!(
            ".{}.{}-{}.tmp",
            self.path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id(),
            TEMPORARIES.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut file = File::create(&temporary)?;
            file.write_all(&self.header(values.len()))?;
            // SAFETY: the byte view covers exactly `values`; f32 has no padding.
            let bytes = unsafe {
                std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 4)
            };
            file.write_all(bytes)?;
            file.sync_data()?;
            std::fs::rename(&temporary, &self.path)
        })();
        if let Err(why) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(why);
        }
        self.load(values.len()).ok_or_else(|| {
            std::io::Error::other("kernel cache: the entry just written reads back wrong")
        })
    }

    fn header(&self, len: usize) -> [u8; HEADER_LEN] {
        let stamp = self.cache.stamp;
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&self.form.code().to_le_bytes());
        header[16..24].copy_from_slice(&stamp.len.to_le_bytes());
        header[24..32].copy_from_slice(&stamp.modified_secs.to_le_bytes());
        header[32..36].copy_from_slice(&stamp.modified_nanos.to_le_bytes());
        header[40..48].copy_from_slice(&(len as u64).to_le_bytes());
        header[48..56].copy_from_slice(&stamp.inode.to_le_bytes());
        header[56..64].copy_from_slice(&stamp.changed.0.to_le_bytes());
        header[64..72].copy_from_slice(&stamp.changed.1.to_le_bytes());
        header
    }
}

/// `name` with every character but ASCII letters, digits, `.`, `-` and `_` replaced by `_`.
fn safe_file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The 64-bit FNV-1a hash: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_file(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("unet").join("diffusion_pytorch_model.safetensors");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A stored entry maps back with the same values, in a later cache of the same file too; it
    /// is not used for another size, a changed model file, a cut or foreign entry.
    #[test]
    fn stores_maps_back_and_refuses_what_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let model = model_file(dir.path(), b"weights");
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();

        let cache = KernelCache::for_file(&root, &model).unwrap();
        let entry = cache.entry("down.0/conv1.weight", KernelForm::Winograd);
        assert!(entry.load(values.len()).is_none(), "nothing stored yet");
        assert_eq!(entry.store(&values).unwrap().as_slice(), values);
        let name = entry
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(name, "down.0_conv1.weight.winograd");
        assert!(entry
            .path
            .as_path()
            .parent()
            .unwrap()
            .join("source.txt")
            .is_file());
        let stored = bytes_under(&root);
        assert!(
            stored >= (HEADER_LEN + 4 * values.len()) as u64,
            "{stored} bytes"
        );
        assert_eq!(bytes_under(&dir.path().join("nothing")), 0);

        let again = KernelCache::for_file(&root, &model).unwrap();
        let entry = again.entry("down.0/conv1.weight", KernelForm::Winograd);
        assert_eq!(entry.load(values.len()).unwrap().as_slice(), values);
        assert!(entry.load(values.len() + 1).is_none(), "another size");
        let other = again.entry("down.0/conv2.weight", KernelForm::Winograd);
        assert!(other.load(values.len()).is_none(), "another tensor");

        // Another file of the same size, moved into place with the old one's modification time
        // (as a copy that keeps timestamps does): a Unix stamp still tells them apart.
        #[cfg(unix)]
        {
            let modified = std::fs::metadata(&model).unwrap().modified().unwrap();
            let other = model.with_extension("new");
            std::fs::write(&other, b"WEIGHTS").unwrap();
            let file = File::options().write(true).open(&other).unwrap();
            file.set_modified(modified).unwrap();
            std::fs::rename(&other, &model).unwrap();
            let swapped = KernelCache::for_file(&root, &model).unwrap();
            let entry = swapped.entry("down.0/conv1.weight", KernelForm::Winograd);
            assert!(
                entry.load(values.len()).is_none(),
                "a same-size file in its place"
            );
        }

        // The model file changes (another size): its old entries no longer match.
        std::fs::write(&model, b"other weights").unwrap();
        let changed = KernelCache::for_file(&root, &model).unwrap();
        let entry = changed.entry("down.0/conv1.weight", KernelForm::Winograd);
        assert!(entry.load(values.len()).is_none(), "a changed model file");
        let doubled: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        assert_eq!(entry.store(&doubled).unwrap().as_slice(), doubled);
        assert_eq!(entry.load(values.len()).unwrap().as_slice(), doubled);

        // A cut entry, and one whose header is not ours, are not used.
        let bytes = std::fs::read(entry.path.as_path()).unwrap();
        std::fs::write(entry.path.as_path(), &bytes[..bytes.len() - 4]).unwrap();
        assert!(entry.load(values.len()).is_none(), "a cut entry");
        let mut foreign = bytes.clone();
        foreign[8] ^= 1;
        std::fs::write(entry.path.as_path(), &foreign).unwrap();
        assert!(entry.load(values.len()).is_none(), "another format version");

        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(entry.path.as_path().parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// The variable moves the folder or turns the cache off; unset or empty, the cache lives in
    /// this program's cache folder.
    #[test]
    fn the_variable_moves_or_turns_off_the_cache() {
        let home = PathBuf::from("/home/u/.cache/pix2pix-zero");
        let moved = root_from(Some("/tmp/c".into()), home.clone());
        assert_eq!(moved, Some(PathBuf::from("/tmp/c")));
        assert_eq!(root_from(Some("off".into()), home.clone()), None);
        let default = Some(home.join("kernels"));
        assert_eq!(root_from(Some("".into()), home.clone()), default);
        assert_eq!(root_from(None, home), default);
    }

    /// A Winograd layer loaded from a file, f32 or f16, stores its transformed kernel on the
    /// first load and maps it on the next, with the same output as a load without the cache; a
    /// 1×1 layer stores nothing.
    #[test]
    fn a_winograd_layer_stores_then_maps_its_kernel() {
        use crate::engine::grad_ops::Conv2d;
        use crate::engine::weights::WeightSource;
        use candle_core::{DType, Device, Module, Tensor};

        let dir = tempfile::tempdir().unwrap();
        let (root, device) = (dir.path().join("cache"), Device::Cpu);
        let channels = 128;
        let random = |shape: &[usize], std| Tensor::randn(0f32, std, shape, &device).unwrap();
        let tensors = [
            ("conv.weight", random(&[channels, channels, 3, 3], 0.05)),
            ("conv.bias", random(&[channels], 0.1)),
            ("proj.weight", random(&[channels, channels, 1, 1], 0.05)),
            ("proj.bias", random(&[channels], 0.1)),
        ];
        let x = random(&[1, channels, 9, 7], 1.0);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let cached = crate::engine::cpu::isa() != crate::engine::cpu::Isa::Candle;
        for dtype in [DType::F32, DType::F16] {
            let model = dir.path().join(format!("model-{dtype:?}.safetensors"));
            let in_file: std::collections::HashMap<_, _> = tensors
                .iter()
                .map(|(name, t)| (name.to_string(), t.to_dtype(dtype).unwrap()))
                .collect();
            candle_core::safetensors::save(&in_file, &model).unwrap();
            let load = |name: &str, kernel, cache: Option<&Path>| {
                let source = WeightSource::open(&model, DType::F32, &device)
                    .unwrap()
                    .with_kernel_cache(cache);
                let padding = kernel / 2;
                Conv2d::load(source.pp(name), channels, channels, kernel, padding, 1).unwrap()
            };
            let output = |conv: &Conv2d| values(&conv.forward(&x).unwrap());

            let plain = output(&load("conv", 3, None));
            let first = output(&load("conv", 3, Some(&root)));
            let cache = KernelCache::for_file(&root, &model).unwrap();
            let entry = cache.entry("conv.weight", KernelForm::Winograd);
            let what = format!("{dtype:?} file");
            assert_eq!(
                entry.path.as_path().is_file(),
                cached,
                "{what}: stored on the first load"
            );
            let second = output(&load("conv", 3, Some(&root)));
            assert_eq!(first, plain, "{what}");
            assert_eq!(second, plain, "{what}");
            if cached {
                // The next load reads the entry, not the weights: with its values zeroed, only
                // the bias is left.
                let mut bytes = std::fs::read(entry.path.as_path()).unwrap();
                bytes[HEADER_LEN..].fill(0);
                std::fs::write(entry.path.as_path(), &bytes).unwrap();
                let bias = values(&in_file["conv.bias"].to_dtype(DType::F32).unwrap());
                let zeroed = output(&load("conv", 3, Some(&root)));
                let only_bias = zeroed.iter().enumerate().all(|(i, &v)| v == bias[i / 63]);
                assert!(only_bias, "{what}: the entry's values are used");
            }

            load("proj", 1, Some(&root));
            let proj = cache.entry("proj.weight", KernelForm::Winograd);
            assert!(
                !proj.path.as_path().exists(),
                "{what}: a 1x1 layer has no transformed kernel"
            );
        }
    }

    /// Two model files get two folders; the folder's name says which model it is.
    #[test]
    fn model_files_get_folders_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let a = model_file(&dir.path().join("a"), b"x");
        let b = model_file(&dir.path().join("b"), b"x");
        let (a, b) = (
            KernelCache::for_file(&root, &a).unwrap(),
            KernelCache::for_file(&root, &b).unwrap(),
        );
        assert_ne!(a.dir, b.dir);
        let name = a.dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with("-unet-diffusion_pytorch_model"), "{name}");
        assert!(KernelCache::for_file(&root, &dir.path().join("missing")).is_none());
    }
}
