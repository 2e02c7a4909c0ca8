//! The llama.cpp control-vector GGUF, read and written.
//!
//! Layout (llama.cpp `common_control_vector_load_one`, repeng `export_gguf`):
//! `general.architecture = "controlvector"`, `controlvector.model_hint` (the model type, e.g.
//! `"llama"`), `controlvector.layer_count`, and one F32 1-D tensor `direction.N` per steered
//! layer, N >= 1, each as long as the model's hidden size. `direction.N` is added to the output
//! of 0-based decoder layer N at every position; layer 0 is never steered (llama.cpp rejects
//! `direction.0`, and so do we). Files written here load in llama.cpp and repeng, and theirs
//! load here.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use models::error::candle_message;
use models::loader::gguf_check::check_gguf;

use crate::error::{PluginError, Result};

pub const ARCHITECTURE: &str = "controlvector";

/// A control vector: one direction per steered layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVector {
    /// `controlvector.model_hint`, when the file has one.
    pub model_hint: Option<String>,
    /// Layer index -> direction (hidden size long).
    pub directions: BTreeMap<usize, Vec<f32>>,
}

impl ControlVector {
    /// Reads `path`, checking the layout above; every fault names the file and the tensor.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| PluginError::bad_file(path, e))?;
        Self::parse(path, &bytes)
    }

    /// Parses the bytes of a file; `path` only names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| PluginError::bad_file(path, m);
        // candle panics on some malformed headers (a zero alignment, sizes that overflow);
        // it only sees files that pass this walk.
        check_gguf(bytes).map_err(|e| bad(format!("invalid GGUF: {e}")))?;
        let mut file = std::io::Cursor::new(bytes);
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| bad(format!("not a GGUF file: {}", candle_message(e))))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok());
        if arch.map(String::as_str) != Some(ARCHITECTURE) {
            return Err(bad(format!(
                "general.architecture is {arch:?}, not \"{ARCHITECTURE}\""
            )));
        }
        let model_hint = content
            .metadata
            .get("controlvector.model_hint")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let mut directions = BTreeMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let layer = parse_name(name)
                .ok_or_else(|| bad(format!("tensor `{name}` is not direction.N with N >= 1")))?;
            let info = &content.tensor_infos[name];
            if info.ggml_dtype != GgmlDType::F32 || info.shape.rank() != 1 {
                return Err(bad(format!(
                    "tensor `{name}` must be a 1-D F32 vector, found {:?} {:?}",
                    info.ggml_dtype,
                    info.shape.dims()
                )));
            }
            let t = content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(|e| bad(format!("tensor `{name}`: {}", candle_message(e))))?;
            let values = t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
            directions.insert(layer, values);
        }
        if directions.is_empty() {
            return Err(bad("the file holds no direction.N tensors".into()));
        }
        Ok(Self {
            model_hint,
            directions,
        })
    }

    /// Writes the file (F32 tensors, sorted by layer).
    pub fn write(&self, path: &Path) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| PluginError::bad_file(path, e);
        let mut tensors = Vec::new();
        for (layer, values) in &self.directions {
            if *layer == 0 {
                return Err(err(&"layer 0 is never steered; direction.0 is invalid"));
            }
            let t = Tensor::new(values.as_slice(), &Device::Cpu)?;
            tensors.push((
                format!("direction.{layer}"),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ));
        }
        let mut metadata = vec![
            ("general.architecture", Value::String(ARCHITECTURE.into())),
            (
                "controlvector.layer_count",
                Value::U32(self.directions.len() as u32),
            ),
        ];
        if let Some(hint) = &self.model_hint {
            metadata.push(("controlvector.model_hint", Value::String(hint.clone())));
        }
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut file = std::fs::File::create(path).map_err(|e| err(&e))?;
        gguf_file::write(&mut file, &md, &ts).map_err(|e| err(&e))
    }
}

fn parse_name(name: &str) -> Option<usize> {
    let n: usize = name.strip_prefix("direction.")?.parse().ok()?;
    (n >= 1).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.gguf");
        let cv = ControlVector {
            model_hint: Some("llama".into()),
            directions: BTreeMap::from([(1, vec![0.5, -1.0, 2.0]), (7, vec![0.0, 1.0, 0.25])]),
        };
        cv.write(&path).unwrap();
        assert_eq!(ControlVector::read(&path).unwrap(), cv);

        let zero = ControlVector {
            model_hint: None,
            directions: BTreeMap::from([(0, vec![1.0])]),
        };
        assert!(zero.write(&dir.path().join("z.gguf")).is_err());
        std::fs::write(dir.path().join("junk.gguf"), b"not gguf").unwrap();
        let err = ControlVector::read(&dir.path().join("junk.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
    }

    #[test]
    fn a_model_file_is_not_a_control_vector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let t = QTensor::quantize(
            &Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let arch = Value::String("llama".into());
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut f,
            &[("general.architecture", &arch)],
            &[("direction.1", &t)],
        )
        .unwrap();
        let err = ControlVector::read(&path).unwrap_err().to_string();
        assert!(err.contains("not \"controlvector\""), "{err}");
    }

    /// A control vector's bytes with a patch at `at` bytes after the first `marker`.
    fn patched(bytes: &[u8], marker: &[u8], at: usize, patch: &[u8]) -> Vec<u8> {
        let start = bytes
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap();
        let mut out = bytes.to_vec();
        let at = start + marker.len() + at;
        out[at..at + patch.len()].copy_from_slice(patch);
        out
    }

    fn written() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.gguf");
        let cv = ControlVector {
            model_hint: Some("llama".into()),
            directions: BTreeMap::from([(1, vec![0.5, -1.0, 2.0, 4.0])]),
        };
        cv.write(&path).unwrap();
        std::fs::read(&path).unwrap()
    }

    /// The message of the `BadFile` that `bytes` must give; any other outcome fails.
    fn bad_file_message(bytes: &[u8]) -> String {
        let path = Path::new("/plugins/v.gguf");
        match ControlVector::parse(path, bytes) {
            Err(PluginError::BadFile { path: p, message }) if p == path => message,
            other => panic!("expected a BadFile for {path:?}, got {other:?}"),
        }
    }

    #[test]
    fn malformed_control_vectors_are_bad_files_naming_the_field_not_panics() {
        let good = written();
        assert!(ControlVector::parse(Path::new("v.gguf"), &good).is_ok());
        // After the tensor name: n_dims (u32), one dim (u64), type (u32), offset (u64).
        let name = b"direction.1".as_slice();
        let cases = [
            (
                patched(&good, name, 4, &(1u64 << 62).to_le_bytes()),
                "`direction.1`: dims",
            ),
            (
                patched(&good, name, 0, &1000u32.to_le_bytes()),
                "`direction.1`: dims",
            ),
            (
                patched(&good, name, 16, &(1u64 << 40).to_le_bytes()),
                "`direction.1`: offset",
            ),
            (
                patched(
                    &good,
                    b"general.architecture",
                    4,
                    &(1u64 << 60).to_le_bytes(),
                ),
                "general.architecture:",
            ),
        ];
        for (bytes, field) in cases {
            let message = bad_file_message(&bytes);
            assert!(message.contains(field), "{field}: {message}");
        }
        let zero = Value::U32(0);
        let arch = Value::String(ARCHITECTURE.into());
        let t = QTensor::quantize(
            &Tensor::new(&[1f32; 4], &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let mut aligned = std::io::Cursor::new(Vec::new());
        let md = [
            ("general.architecture", &arch),
            ("general.alignment", &zero),
        ];
        gguf_file::write(&mut aligned, &md, &[("direction.1", &t)]).unwrap();
        let message = bad_file_message(aligned.get_ref());
        assert!(message.contains("general.alignment"), "{message}");
    }

    #[test]
    fn truncated_or_mutated_control_vectors_never_panic() {
        use rand::{Rng, SeedableRng};
        let good = written();
        for cut in 0..good.len() {
            // Only the zero padding after the last tensor may go.
            if ControlVector::parse(Path::new("v.gguf"), &good[..cut]).is_ok() {
                assert!(good[cut..].iter().all(|&b| b == 0), "cut at {cut}");
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
        for _ in 0..5_000 {
            let mut bytes = good.clone();
            for _ in 0..rng.random_range(1..=3) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            let _ = ControlVector::parse(Path::new("v.gguf"), &bytes);
        }
    }
}
