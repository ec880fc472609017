//! GGUF file reader (v2/v3): header, metadata, tensor infos and memory-mapped tensor data.

pub mod quants;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use quants::GgmlType;

/// GGUF magic number, "GGUF" read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:#010x})")]
    BadMagic(u32),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("GGUF file truncated at byte {0}")]
    Truncated(usize),
    #[error("invalid GGUF: {0}")]
    Invalid(String),
    #[error("unknown GGUF metadata value type {0}")]
    UnknownValueType(u32),
    #[error("unsupported ggml tensor type {0}")]
    UnsupportedType(u32),
    #[error("metadata key `{0}` missing")]
    MissingKey(String),
    #[error("metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("tensor `{0}` not found")]
    MissingTensor(String),
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// Any integer value as u64 (negative values are rejected).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (GGUF stores dims innermost-first; this is reversed).
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Offset relative to the start of the tensor data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn num_bytes(&self) -> usize {
        let (block, size) = self.ggml_type.block_layout();
        self.num_elements() / block * size
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data: GgufData,
    data_start: usize,
}

enum GgufData {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl GgufData {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mmap(m) => m,
            Self::Owned(v) => v,
        }
    }
}

impl GgufFile {
    /// Open and parse a GGUF file; tensor data stays memory-mapped.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only; the mapping is only read.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(GgufData::Mmap(mmap))
    }

    /// Parse a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(GgufData::Owned(bytes))
    }

    fn parse(data: GgufData) -> Result<Self, GgufError> {
        let mut r = Reader {
            buf: data.bytes(),
            pos: 0,
        };
        let magic = r.u32()?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 8 {
                return Err(GgufError::Invalid(format!("tensor {name}: {n_dims} dims")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(usize::try_from(r.u64()?).map_err(|_| r.invalid("dimension"))?);
            }
            dims.reverse();
            let ggml_type = GgmlType::from_u32(r.u32()?)?;
            let offset = r.u64()?;
            let info = TensorInfo {
                name: name.clone(),
                shape: dims,
                ggml_type,
                offset,
            };
            let (block, _) = ggml_type.block_layout();
            if info.shape.last().copied().unwrap_or(1) % block != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {name}: row length not a multiple of the {block}-element block"
                )));
            }
            tensors.insert(name, info);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().filter(|a| *a > 0).ok_or_else(|| {
                GgufError::Invalid("general.alignment must be a positive integer".into())
            })?,
            None => DEFAULT_ALIGNMENT,
        };
        let pos = r.pos as u64;
        let data_start = pos.div_ceil(alignment) * alignment;
        let data_start = usize::try_from(data_start).map_err(|_| r.invalid("data offset"))?;
        let len = data.bytes().len();
        for t in tensors.values() {
            let end = data_start as u64 + t.offset + t.num_bytes() as u64;
            if end > len as u64 {
                return Err(GgufError::Invalid(format!(
                    "tensor {} ends at byte {end}, past the file end {len}",
                    t.name
                )));
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            data,
            data_start,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_u64().ok_or(GgufError::WrongType {
            key: key.into(),
            found: v.type_name(),
            expected: "unsigned integer",
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_f64().ok_or(GgufError::WrongType {
            key: key.into(),
            found: v.type_name(),
            expected: "number",
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_str().ok_or(GgufError::WrongType {
            key: key.into(),
            found: v.type_name(),
            expected: "string",
        })
    }

    /// Raw bytes of a tensor (in its ggml encoding).
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))?;
        let start = self.data_start + info.offset as usize;
        Ok((info, &self.data.bytes()[start..start + info.num_bytes()]))
    }

    /// A tensor dequantized to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let (info, bytes) = self.tensor_bytes(name)?;
        let out = quants::dequantize(info.ggml_type, bytes, info.num_elements())?;
        Ok((info.shape.clone(), out))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(GgufError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn invalid(&self, what: &str) -> GgufError {
        GgufError::Invalid(format!("{what} out of range at byte {}", self.pos))
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    fn len(&mut self) -> Result<usize, GgufError> {
        let n = self.u64()?;
        // Every element takes at least one byte: a count past the remaining bytes is corrupt.
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(GgufError::Truncated(self.pos));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>()?[0]),
            1 => GgufValue::I8(self.arr::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr()?)),
            7 => GgufValue::Bool(self.arr::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(GgufError::Invalid("arrays nested too deep".into()));
                }
                let elem_ty = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr()?)),
            t => return Err(GgufError::UnknownValueType(t)),
        })
    }
}

/// Writes GGUF v3 images; used by tests to build files with known contents.
pub mod writer {
    use super::{GgmlType, GgufValue};

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(0);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    put_value(out, i);
                }
            }
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// Serialize metadata and tensors (row-major shape, raw ggml bytes) as GGUF v3, 32-aligned.
    pub fn write(
        metadata: &[(&str, GgufValue)],
        tensors: &[(&str, Vec<usize>, GgmlType, Vec<u8>)],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&super::GGUF_MAGIC.to_le_bytes());
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, shape, ty, bytes) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&(*ty as u32).to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes.len() as u64).div_ceil(32) * 32;
        }
        let start = out.len().div_ceil(32) * 32;
        out.resize(start, 0);
        for ((_, _, _, bytes), off) in tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend_from_slice(bytes);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metadata_of_every_type_and_tensor_infos() {
        let meta = vec![
            ("a.u8", GgufValue::U8(7)),
            ("a.i8", GgufValue::I8(-7)),
            ("a.u16", GgufValue::U16(700)),
            ("a.i16", GgufValue::I16(-700)),
            ("a.u32", GgufValue::U32(70000)),
            ("a.i32", GgufValue::I32(-70000)),
            ("a.f32", GgufValue::F32(1.5)),
            ("a.bool", GgufValue::Bool(true)),
            ("a.str", GgufValue::String("héllo".into())),
            (
                "a.arr",
                GgufValue::Array(vec![
                    GgufValue::String("x".into()),
                    GgufValue::String("yz".into()),
                ]),
            ),
            ("a.u64", GgufValue::U64(1 << 40)),
            ("a.i64", GgufValue::I64(-(1 << 40))),
            ("a.f64", GgufValue::F64(0.25)),
        ];
        let t0: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t1: Vec<u8> = [half::f16::from_f32(-2.5)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let img = writer::write(
            &meta,
            &[
                ("w", vec![2, 3], GgmlType::F32, t0),
                ("b", vec![1], GgmlType::F16, t1),
            ],
        );
        let g = GgufFile::from_bytes(img).unwrap();
        assert_eq!(g.version, 3);
        for (k, v) in &meta {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        assert_eq!(g.get_u64("a.u32").unwrap(), 70000);
        assert!(g.get_u64("a.i8").is_err());
        assert_eq!(g.get_str("a.str").unwrap(), "héllo");
        let (shape, w) = g.tensor_f32("w").unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(w, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(g.tensor_f32("b").unwrap().1, vec![-2.5]);
        assert_eq!(g.tensors["b"].offset, 32);
        assert!(matches!(
            g.tensor_f32("nope"),
            Err(GgufError::MissingTensor(_))
        ));
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        assert!(matches!(
            GgufFile::from_bytes(b"GGML\x03\0\0\0".to_vec()),
            Err(GgufError::BadMagic(_))
        ));
        let mut v1 = b"GGUF".to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(v1),
            Err(GgufError::UnsupportedVersion(1))
        ));
        let img = writer::write(&[("k", GgufValue::String("value".into()))], &[]);
        // header 24 + key 9 + type 4 + string 13 bytes; any shorter prefix is truncated.
        assert!(img.len() >= 50);
        for cut in 0..50 {
            assert!(
                GgufFile::from_bytes(img[..cut].to_vec()).is_err(),
                "cut {cut}"
            );
        }
        // A tensor whose data runs past the end of the file.
        let mut img = writer::write(&[], &[("w", vec![4], GgmlType::F32, vec![0; 16])]);
        img.truncate(img.len() - 4);
        assert!(matches!(
            GgufFile::from_bytes(img),
            Err(GgufError::Invalid(_))
        ));
    }
}
