//! Text ↔ token ids through the `tokenizers` crate, plus the chat template.
//!
//! BOS rule: DeepSeek's tokenizer adds no BOS by itself; plain prompts get the config's
//! `bos_token_id` prepended. A chat-templated prompt carries its own BOS text.

use crate::ModelError;
use crate::config::ModelConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A loaded tokenizer with the model's special-token rules.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_id: Option<u32>,
    chat_template: Option<ChatTemplate>,
}

/// One turn of a conversation, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug)]
struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (and `tokenizer_config.json` if present); `None` without one.
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Option<Self>, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let mut t = Self::from_file(&path, config.bos_token_id)?;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|source| ModelError::Io { path: cfg_path.clone(), err: source })?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|source| ModelError::Json { path: cfg_path.clone(), err: source })?;
            t = t.with_tokenizer_config(&v);
        }
        Ok(Some(t))
    }

    /// Loads a `tokenizer.json`; `bos_id` is prepended by [`Tokenizer::encode`].
    pub fn from_file(path: &Path, bos_id: Option<u32>) -> Result<Self, ModelError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer { path: path.into(), reason: e.to_string() })?;
        Ok(Tokenizer { inner, path: path.into(), bos_id, chat_template: None })
    }

    fn err(&self, e: impl ToString) -> ModelError {
        ModelError::Tokenizer { path: self.path.clone(), reason: e.to_string() }
    }

    /// Ids of `text` exactly as the tokenizer splits it (no BOS).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self.inner.encode(text, false).map_err(|e| self.err(e))?.get_ids().to_vec())
    }

    /// A plain prompt: BOS (when the model has one) then the text's ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids: Vec<u32> = self.bos_id.into_iter().collect();
        ids.extend(self.encode_raw(text)?);
        Ok(ids)
    }

    /// A one-turn chat prompt rendered with the template from `tokenizer_config.json`.
    pub fn encode_chat(&self, user_message: &str) -> Result<Vec<u32>, ModelError> {
        let text = self.render_chat(&[ChatMessage { role: "user".into(), content: user_message.into() }])?;
        self.encode_raw(&text)
    }

    /// A chat prompt: `messages` rendered with the template, then tokenized.
    pub fn encode_messages(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        self.encode_raw(&self.render_chat(messages)?)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The chat template applied to `messages`, with the generation prompt appended.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let t = self.chat_template.as_ref().ok_or_else(|| self.err("tokenizer_config.json has no chat_template"))?;
        // As transformers' apply_chat_template: trim_blocks, lstrip_blocks, loop controls.
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let tmpl = env.template_from_str(&t.source).map_err(|e| self.err(format!("chat_template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &t.bos_token,
            eos_token => &t.eos_token,
        })
        .map_err(|e| self.err(format!("chat_template: {e}")))
    }

    /// Uses `tokenizer_config` (the JSON of a `tokenizer_config.json`) for the chat template
    /// and its special-token texts.
    pub fn with_tokenizer_config(mut self, tokenizer_config: &Value) -> Self {
        self.chat_template = chat_template(tokenizer_config);
        self
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// Text of `ids` with special tokens kept (for comparisons with other tokenizers).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, false).map_err(|e| self.err(e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn chat_template(v: &Value) -> Option<ChatTemplate> {
    let token = |k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_owned(),
        _ => String::new(),
    };
    let source = match v.get("chat_template")? {
        Value::String(s) => s.clone(),
        // A list of named templates: take "default".
        Value::Array(a) => a
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))?
            .get("template")?
            .as_str()?
            .to_owned(),
        _ => return None,
    };
    Some(ChatTemplate { source, bos_token: token("bos_token"), eos_token: token("eos_token") })
}

/// Incremental detokenizer: turns generated ids into text pieces whose concatenation is the
/// decoded text, holding a piece back while it ends in an incomplete UTF-8 sequence. Decodes
/// only a short window of recent ids per token (as text-generation-inference does).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// Adds `id` and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// The text still held back (an incomplete UTF-8 sequence at the end), decoded as is:
    /// call after the last token so the pieces add up to the whole decoded text.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, ModelError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
