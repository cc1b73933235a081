//! Text ↔ token ids through the `tokenizers` crate, plus the chat template.
//!
//! BOS rule: DeepSeek's tokenizer adds no BOS by itself; plain prompts get the config's
//! `bos_token_id` prepended. A chat-templated prompt carries its own BOS text.
//!
//! Bounded encoding ([`Tokenizer::encode_bounded`]): a text's ids cost memory many times its
//! size, so a text with more ids than a limit is found out in work proportional to the limit:
//! refused unread when its bytes alone prove it too long, else tokenized in pieces cut where
//! the pieces' ids add up to the whole text's, stopping once past the limit.

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
    bounds: Bounds,
}

/// The ids of a text, or the news that it has more than the limit asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bounded {
    Ids(Vec<u32>),
    /// More ids than the limit: at least this many.
    TooLong {
        at_least: usize,
    },
}

/// Text is tokenized in pieces of about this many bytes (each costs ~150 times that while it
/// is tokenized).
const PIECE_BYTES: usize = 16 * 1024;

/// Fullwidth punctuation after which a CJK character starts a new word for the pre-tokenizers
/// [`is_cut`] holds for.
const CJK_STOPS: [char; 7] = ['。', '，', '、', '！', '？', '；', '：'];

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
        let bounds = Bounds::of(&inner);
        Ok(Tokenizer { inner, path: path.into(), bos_id, chat_template: None, bounds })
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

    /// [`Tokenizer::encode`], or [`Bounded::TooLong`] as soon as more than `max_tokens` ids
    /// (BOS included) are certain; the ids are exactly `encode`'s when they fit.
    pub fn encode_bounded(&self, text: &str, max_tokens: usize) -> Result<Bounded, ModelError> {
        let bos = usize::from(self.bos_id.is_some());
        let Some(budget) = max_tokens.checked_sub(bos) else {
            return Ok(Bounded::TooLong { at_least: bos });
        };
        Ok(match self.encode_raw_bounded(text, budget)? {
            Bounded::Ids(raw) => Bounded::Ids(self.bos_id.into_iter().chain(raw).collect()),
            Bounded::TooLong { at_least } => Bounded::TooLong { at_least: at_least + bos },
        })
    }

    /// [`Tokenizer::encode_messages`] bounded as [`Tokenizer::encode_bounded`] is.
    pub fn encode_messages_bounded(&self, messages: &[ChatMessage], max_tokens: usize) -> Result<Bounded, ModelError> {
        self.encode_raw_bounded(&self.render_chat(messages)?, max_tokens)
    }

    fn encode_raw_bounded(&self, text: &str, max_tokens: usize) -> Result<Bounded, ModelError> {
        if let Some(m) = self.bounds.max_token_bytes
            && text.len() > max_tokens.saturating_mul(m)
        {
            return Ok(Bounded::TooLong { at_least: text.len().div_ceil(m) });
        }
        let mut ids = Vec::new();
        let target = if self.bounds.pieces { PIECE_BYTES } else { usize::MAX };
        for piece in pieces(text, target) {
            ids.extend(self.encode_raw(piece)?);
            if ids.len() > max_tokens {
                return Ok(Bounded::TooLong { at_least: ids.len() });
            }
        }
        Ok(Bounded::Ids(ids))
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

/// What a tokenizer's shape allows [`Tokenizer::encode_bounded`] to skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    /// Most input bytes one token can stand for, when the shape bounds it: byte-level BPE
    /// without a normalizer, whose tokens each stand for their own bytes (a vocabulary
    /// string's characters are bytes), or an added token's text.
    max_token_bytes: Option<usize>,
    /// Whether text may be tokenized in pieces cut by [`is_cut`].
    pieces: bool,
}

impl Bounds {
    fn of(t: &tokenizers::Tokenizer) -> Self {
        let added = t.get_added_tokens_decoder();
        let plain_text = t.get_normalizer().is_none_or(|n| {
            serde_json::to_value(n).is_ok_and(|v| v == serde_json::json!({"type": "Sequence", "normalizers": []}))
        });
        // A token that takes in the whitespace around it can stand for any number of bytes.
        let fixed_width = added.values().all(|a| !a.lstrip && !a.rstrip);
        let byte_level = t
            .get_pre_tokenizer()
            .and_then(|p| serde_json::to_string(p).ok())
            .is_some_and(|json| json.contains(r#""type":"ByteLevel""#));
        let max_token_bytes = match t.get_model() {
            tokenizers::models::ModelWrapper::BPE(bpe)
                if plain_text && fixed_width && byte_level && !(bpe.unk_token.is_some() && bpe.fuse_unk) =>
            {
                let vocab = bpe.get_vocab().keys().map(|k| k.chars().count()).max().unwrap_or(1);
                Some(added.values().map(|a| a.content.len()).fold(vocab, usize::max).max(1))
            }
            _ => None,
        };
        // Pieces never split an added token or meet truncation, and the pre-tokenizer must
        // start a word at every cut of the probe (the regex pre-tokenizers of byte-level BPE:
        // GPT-2's, DeepSeek's).
        let splits_no_added = added.values().all(|a| {
            !a.lstrip
                && !a.rstrip
                && !a.single_word
                && !a.content.contains([' ', '\n'])
                && !a.content.contains(CJK_STOPS)
        });
        let pieces =
            plain_text && splits_no_added && t.get_truncation().is_none() && t.get_padding().is_none() && probe_cuts(t);
        Bounds { max_token_bytes, pieces }
    }
}

/// Text with every kind of cut in varied company; a tokenizer tokenizes it in pieces only if
/// the pieces cut at each of them give the whole text's ids.
const PROBE: &str = "Hello world, it's a probe: fn x() { return y; } //.com and 12 345 words\n\
                     Next line here\ncode\nend. 深度求索。下一句，再来、好！是？对；说：日本語のテキストです。カタカナ";

fn probe_cuts(t: &tokenizers::Tokenizer) -> bool {
    let ids = |s: &str| t.encode(s, false).map(|e| e.get_ids().to_vec()).ok();
    let Some(whole) = ids(PROBE) else { return false };
    let mut from = 0;
    let mut pieced = Vec::new();
    for cut in (1..PROBE.len()).filter(|&p| is_cut(PROBE, p)).chain([PROBE.len()]) {
        let Some(piece) = ids(&PROBE[from..cut]) else { return false };
        pieced.extend(piece);
        from = cut;
    }
    pieced == whole
}

/// Whether a regex pre-tokenizer starts a new word at byte `p` of `text` whatever comes before
/// and after, so the ids of `text[..p]` and `text[p..]` add up to those of `text`: before a
/// space between two letters (" word"), after a newline between two letters, and after
/// fullwidth punctuation before a CJK character. Letters are ASCII here, so no script rule,
/// digit grouping or contraction reaches across.
fn is_cut(text: &str, p: usize) -> bool {
    let b = text.as_bytes();
    let letter = |i: usize| b.get(i).is_some_and(u8::is_ascii_alphabetic);
    if p == 0 || p >= b.len() {
        return false;
    }
    match (b[p - 1], b[p]) {
        (_, b' ') => letter(p - 1) && letter(p + 1),
        (b'\n', _) => p >= 2 && letter(p - 2) && letter(p),
        (_, c) if c >= 0xE0 && text.is_char_boundary(p) => {
            text[..p].chars().next_back().is_some_and(|c| CJK_STOPS.contains(&c))
                && text[p..].chars().next().is_some_and(is_cjk_letter)
        }
        _ => false,
    }
}

/// CJK ideographs, hiragana and katakana letters (what DeepSeek's pre-tokenizer isolates,
/// less its punctuation and marks).
fn is_cjk_letter(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FA5}' | '\u{3041}'..='\u{3096}' | '\u{30A1}'..='\u{30FA}')
}

/// `text` in pieces of about `target` bytes, each ending at a cut ([`is_cut`]): the last cut
/// within `target` bytes, else the first after it, else the end of the text.
fn pieces(text: &str, target: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = if rest.len() <= target {
            rest.len()
        } else {
            (1..=target)
                .rev()
                .find(|&p| is_cut(rest, p))
                .or_else(|| (target + 1..rest.len()).find(|&p| is_cut(rest, p)))
                .unwrap_or(rest.len())
        };
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn default_tokenizer() -> Tokenizer {
        let dir = crate::default_model::resolve_dir(None).expect("default model");
        let config = ModelConfig::from_dir(&dir).expect("config");
        Tokenizer::from_dir(&dir, &config).expect("load").expect("the default model has a tokenizer")
    }

    /// Prose, code, CJK, whitespace runs and special tokens, long enough for many pieces.
    fn varied_text() -> String {
        let parts = [
            "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?\n",
            "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\nprint fib\n",
            "深度求索（DeepSeek）是一家公司。下一句话，再来、好！日本語のテキストです。カタカナ\n",
            "  \t mixed\t whitespace \r\n\r\nline two\nNext words here and there\n",
            "<｜User｜>special tokens inside<｜Assistant｜>and after them<｜end▁of▁sentence｜>text\n",
            "emoji 😀 🚀 ❤️ numbers 1234567 3.14 https://example.com/a?b=c user@example.org\n",
        ];
        (0..2000).map(|i| parts[i % parts.len()]).collect()
    }

    #[test]
    fn cuts_fall_only_between_words() {
        assert!(is_cut("ab cd", 2));
        assert!(is_cut("ab\ncd", 3));
        assert!(is_cut("文。下", 6));
        for (text, p) in [("ab cd", 1), ("ab  cd", 2), ("a1 cd", 2), ("ab 1d", 2), (" \ncd", 2), ("ab\n cd", 3)] {
            assert!(!is_cut(text, p), "{text:?} at {p}");
        }
        assert!(!is_cut("文，A", 6), "a CJK stop cuts only before a CJK letter");
        assert!(!is_cut("ab", 0) && !is_cut("ab", 2), "never at the ends");
    }

    #[test]
    fn pieces_cover_the_text_and_end_at_cuts() {
        let text = varied_text();
        for target in [1, 7, 64, 4096, usize::MAX] {
            let ps: Vec<&str> = pieces(&text, target).collect();
            assert_eq!(ps.concat(), text, "target {target}");
            let mut at = 0;
            for p in &ps[..ps.len() - 1] {
                at += p.len();
                assert!(is_cut(&text, at), "target {target}: piece ends at {at}, not at a cut");
            }
        }
        assert_eq!(pieces("", 4).count(), 0);
        assert_eq!(pieces("aaaaaaaaaa", 3).collect::<Vec<_>>(), ["aaaaaaaaaa"], "no cut: one piece");
        assert_eq!(pieces("aaaa bbbb cccc", 2).collect::<Vec<_>>(), ["aaaa", " bbbb", " cccc"], "first cut after");
    }

    #[test]
    fn the_default_tokenizer_allows_both_shortcuts() {
        // Its longest token, a space and 70 '=' (a reStructuredText rule), is 71 bytes.
        assert_eq!(default_tokenizer().bounds, Bounds { max_token_bytes: Some(71), pieces: true });
    }

    #[test]
    fn bounded_ids_are_the_whole_texts_ids_up_to_the_limit() {
        let t = default_tokenizer();
        let text = varied_text();
        assert!(text.len() > 8 * PIECE_BYTES, "the text is tokenized in many pieces");
        let whole = t.encode(&text).expect("encode");
        assert_eq!(t.encode_bounded(&text, whole.len()).expect("bounded"), Bounded::Ids(whole.clone()));
        assert_eq!(t.encode_bounded(&text, usize::MAX).expect("bounded"), Bounded::Ids(whole.clone()));
        match t.encode_bounded(&text, whole.len() - 1).expect("bounded") {
            Bounded::TooLong { at_least } => assert!(at_least > whole.len() - 1, "{at_least}"),
            Bounded::Ids(_) => panic!("one id over the limit must be refused"),
        }
        let chat = [
            ChatMessage { role: "system".into(), content: "You are terse.".into() },
            ChatMessage { role: "user".into(), content: text.clone() },
        ];
        let whole = t.encode_messages(&chat).expect("chat");
        assert_eq!(t.encode_messages_bounded(&chat, whole.len()).expect("bounded"), Bounded::Ids(whole.clone()));
        assert!(matches!(
            t.encode_messages_bounded(&chat, whole.len() - 1).expect("bounded"),
            Bounded::TooLong { at_least } if at_least >= whole.len()
        ));
    }

    #[test]
    fn a_text_too_long_for_its_limit_is_refused_early() {
        let t = default_tokenizer();
        // Beyond 71 bytes a token: refused from its length alone.
        let huge = "a".repeat(4 << 20);
        assert_eq!(
            t.encode_bounded(&huge, 4096).expect("bounded"),
            Bounded::TooLong { at_least: 1 + (4 << 20) / 71 + 1 }
        );
        // Within the byte bound: tokenized only until the limit is passed, a piece at most beyond.
        let words = "word ".repeat(20_000);
        match t.encode_bounded(&words, 4096).expect("bounded") {
            Bounded::TooLong { at_least } => assert!((4097..=4097 + PIECE_BYTES).contains(&at_least), "{at_least}"),
            Bounded::Ids(ids) => panic!("{} ids accepted", ids.len()),
        }
        assert_eq!(t.encode_bounded("hi", 0).expect("bounded"), Bounded::TooLong { at_least: 1 }, "BOS alone");
        assert_eq!(t.encode_bounded("hi", 2).expect("bounded"), Bounded::Ids(vec![0, 364]));
    }
}
