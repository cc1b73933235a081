//! A checkpoint directory's safetensors files, memory-mapped, with a name → tensor index.
//!
//! Accepts `model.safetensors`, or `model.safetensors.index.json` naming shards. Each file's
//! header is validated up front (a truncated file is refused, naming the file); tensor bytes
//! stay in the page cache until a weight is built from them.

use crate::ModelError;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One mapped safetensors file.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, Entry>,
}

/// A tensor's raw little-endian bytes and what they are.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<PathBuf> = if index.exists() {
            shard_names(&index)?.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                err: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ),
            });
        };
        let mut files: Vec<MappedFile> = Vec::with_capacity(names.len());
        let mut tensors = HashMap::new();
        for path in names {
            let file =
                std::fs::File::open(&path).map_err(|source| ModelError::Io { path: path.clone(), err: source })?;
            // SAFETY: the mapping is read-only and checkpoint files are not modified while an
            // engine runs from them (documented operator contract, as for every mmap loader).
            let map =
                unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), err: source })?;
            let (header_len, meta) = SafeTensors::read_metadata(&map[..])
                .map_err(|e| ModelError::Safetensors { path: path.clone(), reason: e.to_string() })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let entry = Entry {
                    file: files.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                };
                if let Some(first) = tensors.get(&name).map(|e: &Entry| files[e.file].path.clone()) {
                    return Err(ModelError::Safetensors {
                        path,
                        reason: format!("tensor `{name}` is also in {}", first.display()),
                    });
                }
                tensors.insert(name, entry);
            }
            files.push(MappedFile { path, map: Arc::new(map) });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor's name, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, ModelError> {
        let (key, e) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| ModelError::MissingTensor { dir: self.dir.clone(), tensor: name.to_owned() })?;
        let f = &self.files[e.file];
        Ok(TensorView { name: key, path: &f.path, dtype: e.dtype, shape: &e.shape, bytes: &f.map[e.start..e.end] })
    }

    /// Total bytes of all tensors (for progress reporting).
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|e| (e.end - e.start) as u64).sum()
    }
}

fn shard_names(index: &Path) -> Result<BTreeSet<String>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io { path: index.into(), err: source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index.into(), err: source })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Config {
        path: index.into(),
        field: "weight_map".into(),
        reason: "is required and must map tensor names to file names".into(),
    })?;
    map.values()
        .map(|f| {
            f.as_str().filter(|s| !s.contains('/') && !s.contains("..")).map(str::to_owned).ok_or_else(|| {
                ModelError::Config {
                    path: index.into(),
                    field: "weight_map".into(),
                    reason: format!("entry {f} is not a plain file name"),
                }
            })
        })
        .collect()
}
