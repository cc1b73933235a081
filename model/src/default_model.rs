//! The embedded default model: a small DeepSeek-V3 (MLA with q LoRA, a dense first layer, MoE
//! with grouped sigmoid routing, correction bias and a shared expert, YaRN rope, one MTP
//! layer) trained on the CPython 3.11 standard library and its documentation by
//! `tools/train_default_model.py` (docs/DEFAULT_MODEL.md). The binary carries the checkpoint
//! and writes it to the cache directory on first use; `SHA256SUMS` checks every file, so a
//! damaged copy is rewritten rather than loaded.

use crate::ModelError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Bumped whenever the embedded checkpoint changes, so each version has its own directory.
pub const VERSION: u32 = 2;

/// The checkpoint's files, as the binary carries them.
const FILES: [(&str, &[u8]); 5] = [
    ("config.json", include_bytes!("../default-model/config.json")),
    ("generation_config.json", include_bytes!("../default-model/generation_config.json")),
    ("tokenizer.json", include_bytes!("../default-model/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../default-model/tokenizer_config.json")),
    ("model.safetensors", include_bytes!("../default-model/model.safetensors")),
];

/// `sha256sum` lines for [`FILES`], written by the training script with the checkpoint.
const SUMS: &str = include_str!("../default-model/SHA256SUMS");

/// Where the default model lives: `$XDG_CACHE_HOME/expertmesh/default-model-vN` (or
/// `~/.cache/...`, or the temporary directory).
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("expertmesh").join(format!("default-model-v{VERSION}"))
}

/// `dir` if given, else the default model's directory, written if missing or damaged.
pub fn resolve_dir(dir: Option<PathBuf>) -> Result<PathBuf, ModelError> {
    match dir {
        Some(dir) => Ok(dir),
        None => {
            let dir = default_dir();
            ensure(&dir)?;
            Ok(dir)
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The expected SHA-256 of `name` (from `SHA256SUMS`).
fn expected_sum(name: &str) -> Option<&'static str> {
    SUMS.lines().find_map(|line| line.split_once("  ").filter(|(_, file)| *file == name).map(|(sum, _)| sum))
}

/// Makes sure `dir` holds the embedded default model: every file whose checksum differs (or
/// that is missing) is written again, then checked.
pub fn ensure(dir: &Path) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| ModelError::Io { path, err }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, bytes) in FILES {
        let path = dir.join(name);
        let want = expected_sum(name).ok_or_else(|| ModelError::Io {
            path: path.clone(),
            err: std::io::Error::other("SHA256SUMS of the embedded default model has no line for it"),
        })?;
        if std::fs::read(&path).is_ok_and(|have| sha256_hex(&have) == want) {
            continue;
        }
        // A temporary name per writer: several processes, or roles in one process, may
        // create the model at once; each renames a complete file into place.
        static WRITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        let written = std::fs::read(&tmp).map_err(io(&tmp))?;
        let got = sha256_hex(&written);
        if got != want {
            let _ = std::fs::remove_file(&tmp);
            let err = std::io::Error::other(format!(
                "wrote the default model's {name} but read back sha256 {got}, expected {want}"
            ));
            return Err(ModelError::Io { path: tmp, err });
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_files_match_their_checksums() {
        for (name, bytes) in FILES {
            assert_eq!(Some(sha256_hex(bytes).as_str()), expected_sum(name), "{name}");
        }
        assert_eq!(SUMS.lines().count(), FILES.len(), "SHA256SUMS lists exactly the embedded files");
    }

    #[test]
    fn writes_a_loadable_model_and_repairs_a_damaged_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure(dir.path()).expect("write");
        let weights = dir.path().join("model.safetensors");
        let mut damaged = std::fs::read(&weights).expect("read");
        let at = damaged.len() / 2;
        damaged[at] ^= 0x40;
        std::fs::write(&weights, &damaged).expect("damage");
        std::fs::remove_file(dir.path().join("tokenizer.json")).expect("remove");
        ensure(dir.path()).expect("repair");
        assert_eq!(
            Some(sha256_hex(&std::fs::read(&weights).expect("read")).as_str()),
            expected_sum("model.safetensors")
        );
        let loaded =
            crate::load_model(dir.path(), crate::LoadOptions { local_experts: true, ..Default::default() }, &|_| {})
                .expect("load");
        let tok = loaded.tokenizer.expect("tokenizer");
        let ids = tok.encode("héllo 世界\n    return x").expect("encode");
        assert_eq!(ids[0], 0, "BOS first");
        assert_eq!(tok.decode(&ids).expect("decode"), "héllo 世界\n    return x");
        let chat = tok.encode_chat("hi").expect("chat");
        assert_eq!(chat[0], 0, "BOS first");
        assert_eq!(tok.decode_with_special(&chat[chat.len() - 1..]).expect("decode"), "<｜Assistant｜>");
        assert_eq!(loaded.model.config.num_nextn_predict_layers, 1);
    }
}
