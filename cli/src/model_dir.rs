//! Where the model comes from: `--model DIR`, or the embedded default model, generated into
//! the user's cache directory on first use.

use anyhow::Context;
use std::path::PathBuf;

/// `dir` if given, else the default model's directory (created if missing).
pub fn resolve(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let default = model::default_model::default_dir();
    model::default_model::resolve_dir(dir)
        .with_context(|| format!("preparing the default model in {}", default.display()))
}
