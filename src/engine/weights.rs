//! Where a model's layers get their weights: a safetensors file read tensor by tensor, and the
//! f32 tensors a CPU layer can use where they lie, in a read-only mapping of the file.
//!
//! candle's memory-mapped loader copies every tensor out of a mapping of the whole file, and the
//! pages it touched stay in the process until the mapping goes: loading the 3.4 GB UNet briefly
//! held it twice. Copying into fresh memory is also most of the time a load takes, because every
//! new page is zeroed (and, in a virtual machine, first backed by the host) before it is filled.
//! So a layer whose kernel reads the weights in the file's own layout (a linear layer, a 1×1
//! convolution, on the CPU in f32) borrows them from the mapping ([`MappedF32`]): those pages are
//! the page cache's, already in memory, and nothing is copied. A kernel packed at load reads the
//! mapping too and then hands its pages back ([`MappedF32::release`]); every other tensor is read
//! into its own buffer with a positioned read, which leaves nothing mapped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::kernel_cache::{self, CachedKernel, KernelCache, KernelForm};

/// One tensor's entry in the header.
#[derive(Debug, Clone, serde::Deserialize)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// A safetensors file whose header has been read; tensors are read on request.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// The whole file, read-only, for the tensors borrowed in place (none when mapping failed).
    map: Option<Arc<Mmap>>,
    /// Where the data section starts (after the 8-byte length and the header).
    data_start: u64,
    entries: HashMap<String, Entry>,
}

impl SafetensorsFile {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |why: String| {
            candle_core::Error::Msg(format!(
                "`{}` is not a safetensors file: {why}",
                path.display()
            ))
        };
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut len_bytes = [0u8; 8];
        read_at(&file, &mut len_bytes, 0)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len.saturating_sub(8) || header_len > 100_000_000 {
            return Err(bad(format!("its header claims {header_len} bytes")));
        }
        let mut header = vec![0u8; header_len as usize];
        read_at(&file, &mut header, 8)?;
        let mut raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("its header: {e}")))?;
        raw.remove("__metadata__");
        let data_start = 8 + header_len;
        let entries = raw
            .into_iter()
            .map(|(name, value)| {
                let entry: Entry = serde_json::from_value(value)
                    .map_err(|e| bad(format!("the entry of `{name}`: {e}")))?;
                if data_start + entry.data_offsets.1 > file_len
                    || entry.data_offsets.0 > entry.data_offsets.1
                {
                    return Err(bad(format!(
                        "`{name}` lies outside the file (it is cut short)"
                    )));
                }
                Ok((name, entry))
            })
            .collect::<Result<_>>()?;
        // SAFETY: the mapping is read-only and private. Like every loader that maps weights, it
        // trusts the file not to be cut short while the model is loaded.
        let map = unsafe { Mmap::map(&file) }.ok().map(Arc::new);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            map,
            data_start,
            entries,
        })
    }

    /// `name`'s values in place in the mapping, when the file holds them as little-endian f32 at an
    /// aligned offset; `None` otherwise (read a copy instead). They must have `shape`.
    fn mapped_f32(&self, name: &str, shape: &Shape) -> Result<Option<MappedF32>> {
        let (Some(map), Some(entry)) = (self.map.as_ref(), self.entries.get(name)) else {
            return Ok(None);
        };
        if entry.shape != shape.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape.clone(),
                got: entry.shape.clone().into(),
            });
        }
        let (Ok(start), Ok(bytes)) = (
            usize::try_from(self.data_start + entry.data_offsets.0),
            usize::try_from(entry.data_offsets.1 - entry.data_offsets.0),
        ) else {
            return Ok(None);
        };
        let len = entry.shape.iter().product::<usize>();
        if entry.dtype != Dtype::F32 || bytes != len * 4 {
            return Ok(None);
        }
        Ok(MappedF32::in_mapping(Arc::clone(map), start, len))
    }

    /// Reads `name` onto the CPU in the file's dtype.
    fn read(&self, name: &str) -> Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let (start, end) = entry.data_offsets;
        if entry.dtype == Dtype::F32 && cfg!(target_endian = "little") {
            // Straight into the tensor's own buffer: one copy, and one set of fresh pages.
            let count = entry.shape.iter().product::<usize>();
            if count * 4 != (end - start) as usize {
                candle_core::bail!(
                    "`{name}` in `{}`: its size does not fit its shape",
                    self.path.display()
                )
            }
            let mut values = vec![0f32; count];
            // SAFETY: any bytes are a valid f32, and the byte view covers exactly `values`.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), count * 4)
            };
            read_at(&self.file, bytes, self.data_start + start)?;
            return Tensor::from_vec(values, entry.shape.clone(), &Device::Cpu);
        }
        let mut bytes = vec![0u8; (end - start) as usize];
        read_at(&self.file, &mut bytes, self.data_start + start)?;
        let view = TensorView::new(entry.dtype, entry.shape.clone(), &bytes).map_err(|e| {
            candle_core::Error::Msg(format!("`{name}` in `{}`: {e}", self.path.display()))
        })?;
        view.load(&Device::Cpu)
    }
}

/// Fills `buf` from `file` at `offset`.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

impl SimpleBackend for SafetensorsFile {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// The backend of a [`WeightSource`]'s `VarBuilder`, sharing the file with the source.
struct SharedFile(Arc<SafetensorsFile>);

impl SimpleBackend for SharedFile {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.0.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.0.get_unchecked(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// An f32 tensor's values where they lie in a read-only mapping of its safetensors file. Cloning
/// shares the mapping, which lives as long as any clone.
#[derive(Clone)]
pub struct MappedF32 {
    map: Arc<Mmap>,
    /// Byte offset of the first value in the mapping.
    offset: usize,
    /// Number of values.
    len: usize,
}

impl MappedF32 {
    /// The `len` little-endian f32 values at byte `offset` of `map`, if they lie inside it at an
    /// offset aligned for f32 and this target is little-endian; `None` otherwise.
    pub(crate) fn in_mapping(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        let fits = cfg!(target_endian = "little")
            && (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<f32>())
            && len
                .checked_mul(4)
                .and_then(|bytes| bytes.checked_add(offset))
                .is_some_and(|end| end <= map.len());
        fits.then_some(Self { map, offset, len })
    }

    /// The values.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `in_mapping` checked that the range lies in the mapping, is aligned for f32 and
        // holds `len` little-endian f32 values; any bits are a valid f32.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(self.offset).cast(), self.len) }
    }

    /// Hands these values' pages back to the system, for a tensor that was only read to be packed:
    /// they stay in the page cache, no longer count as the process's memory, and are mapped again
    /// from the file if read. (On other systems than Unix, it does nothing.)
    pub fn release(self) {
        #[cfg(unix)]
        // SAFETY: the mapping is private and never written, so dropping its pages loses nothing:
        // the next read of any value in them maps the file's unchanged pages again.
        unsafe {
            // Best effort: the pages only stay counted if the advice fails.
            let _ = self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.offset,
                self.len * std::mem::size_of::<f32>(),
            );
        }
    }
}

impl std::fmt::Debug for MappedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedF32({} values)", self.len)
    }
}

/// f32 weight values that a layer owns or borrows from its mapped file.
#[derive(Debug, Clone)]
pub enum F32Values {
    /// In memory of its own.
    Owned(Vec<f32>),
    /// In place in the file's mapping.
    Mapped(MappedF32),
}

impl std::ops::Deref for F32Values {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Self::Owned(values) => values,
            Self::Mapped(mapped) => mapped.as_slice(),
        }
    }
}

/// Where a model's layers get their weights: a candle `VarBuilder` for tensors, and, when the
/// weights come from a safetensors file, the f32 tensors that can be used in place.
#[derive(Clone)]
pub struct WeightSource {
    vb: VarBuilder<'static>,
    file: Option<Arc<SafetensorsFile>>,
    /// Where the kernels prepared from this file at load are kept (see [`kernel_cache`]).
    kernels: Option<Arc<KernelCache>>,
}

impl WeightSource {
    /// Opens `path`'s header; tensors are read (or mapped) as layers ask for them. Kernels
    /// prepared from them at load are cached in [`kernel_cache::default_root`].
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let file = Arc::new(SafetensorsFile::open(path)?);
        let vb = VarBuilder::from_backend(
            Box::new(SharedFile(Arc::clone(&file))),
            dtype,
            device.clone(),
        );
        Ok(Self {
            vb,
            file: Some(file),
            kernels: None,
        }
        .with_kernel_cache(kernel_cache::default_root().as_deref()))
    }

    /// The same source with its prepared kernels cached under `root` instead (`None`: not
    /// cached).
    pub fn with_kernel_cache(mut self, root: Option<&Path>) -> Self {
        self.kernels = root
            .zip(self.file.as_ref())
            .and_then(|(root, file)| KernelCache::for_file(root, &file.path))
            .map(Arc::new);
        self
    }

    /// The source of the tensors under `prefix.` (candle's `VarBuilder::pp`).
    pub fn pp(&self, prefix: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(prefix),
            file: self.file.clone(),
            kernels: self.kernels.clone(),
        }
    }

    /// The cache entry of tensor `name` prepared as `form`, when this source caches its kernels.
    pub fn cached_kernel(&self, name: &str, form: KernelForm) -> Option<CachedKernel> {
        let cache = self.kernels.as_ref()?;
        Some(cache.entry(&self.full_name(name), form))
    }

    fn full_name(&self, name: &str) -> String {
        if self.vb.prefix().is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.vb.prefix())
        }
    }

    /// `name`, which must have `shape`, in the source's dtype and on its device.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.vb.get(shape, name)
    }

    /// Whether the source has `name`.
    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// The dtype tensors come in.
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// The device tensors come on.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// The `VarBuilder` underneath, for models that take one (candle-transformers' BLIP and T5).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        self.vb.clone()
    }

    /// Whether the tensors go to the CPU kernels in f32 (what [`super::cpu::handles`] says of
    /// the tensors this source gives).
    pub fn feeds_cpu_kernels(&self) -> bool {
        self.dtype() == DType::F32
            && self.device().is_cpu()
            && super::cpu::isa() != super::cpu::Isa::Candle
    }

    /// `name`'s f32 values, which must have `shape`: borrowed in place when the source is a mapped
    /// f32 file and the layer wants f32 on the CPU with the CPU kernels on, else `None` (get a
    /// tensor instead).
    pub fn mapped_f32(&self, shape: impl Into<Shape>, name: &str) -> Result<Option<MappedF32>> {
        let Some(file) = self.file.as_ref().filter(|_| self.feeds_cpu_kernels()) else {
            return Ok(None);
        };
        file.mapped_f32(&self.full_name(name), &shape.into())
    }
}

impl From<VarBuilder<'static>> for WeightSource {
    /// A source of tensors only (random weights, a `VarMap`, a buffer): nothing is borrowed.
    fn from(vb: VarBuilder<'static>) -> Self {
        Self {
            vb,
            file: None,
            kernels: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tensors, dtypes converted, as candle's own loader gives; f32 ones borrowed in
    /// place; a cut file is refused.
    #[test]
    fn reads_what_candle_reads_borrows_f32_and_refuses_a_cut_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("a".to_string(), a.clone()), ("b.c".to_string(), b)]),
            &path,
        )
        .unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert!(file.contains_tensor("b.c") && !file.contains_tensor("b"));
        let got = file
            .get(
                (2, 3, 4).into(),
                "a",
                Default::default(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let half = file.get_unchecked("b.c", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(half.to_vec1::<f32>().unwrap(), vec![1.5, -2.0]);
        let wrong = file.get(
            (4, 6).into(),
            "a",
            Default::default(),
            DType::F32,
            &Device::Cpu,
        );
        assert!(wrong
            .unwrap_err()
            .to_string()
            .contains("shape mismatch for a"));
        assert!(matches!(
            file.get_unchecked("missing", DType::F32, &Device::Cpu),
            Err(candle_core::Error::CannotFindTensor { .. })
        ));

        // Through a weight source: the f32 tensor is borrowed in place, the f16 one is not.
        let source = WeightSource::open(&path, DType::F32, &Device::Cpu).unwrap();
        let mapped = source.mapped_f32((2, 3, 4), "a").unwrap().unwrap();
        assert_eq!(
            mapped.as_slice(),
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(source.pp("b").mapped_f32(2, "c").unwrap().is_none());
        let wrong = source.mapped_f32((4, 6), "a").unwrap_err().to_string();
        assert!(wrong.contains("shape mismatch for a"), "{wrong}");
        let in_f16 = WeightSource::open(&path, DType::F16, &Device::Cpu).unwrap();
        assert!(in_f16.mapped_f32((2, 3, 4), "a").unwrap().is_none());
        drop((source, in_f16));
        // The mapping outlives its source.
        assert_eq!(mapped.as_slice()[23], 23.0);
        drop(mapped);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let cut = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(cut.contains("cut short"), "{cut}");
    }
}
