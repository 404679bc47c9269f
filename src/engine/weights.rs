//! Weights read from a safetensors file tensor by tensor, with positioned reads.
//!
//! candle's memory-mapped loader copies every tensor out of a mapping of the whole file, and the
//! pages it touched stay in the process until the mapping goes: loading the 3.4 GB UNet briefly
//! held it twice, which made loading the peak of a whole 512² edit (7.5 GB). Reading each tensor
//! into its own buffer holds one copy, plus the one tensor being read.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

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
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            entries,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tensors, dtypes converted, as candle's own loader gives; a cut file is refused.
    #[test]
    fn reads_what_candle_reads_and_refuses_a_cut_file() {
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

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let cut = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(cut.contains("cut short"), "{cut}");
    }
}
