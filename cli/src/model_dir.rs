//! Where the model comes from: `--model DIR`, or the embedded default model, generated into
//! the user's cache directory on first use.

use anyhow::Context;
use std::path::PathBuf;

/// `dir` if given, else the default model's directory (created if missing).
pub fn resolve(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = dir {
        return Ok(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("expertmesh").join(format!("default-model-v{}", model::default_model::VERSION));
    model::default_model::ensure(&dir).with_context(|| format!("preparing the default model in {}", dir.display()))?;
    Ok(dir)
}
