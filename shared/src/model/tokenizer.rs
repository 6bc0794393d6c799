//! The CLIP tokenizer of Stable Diffusion, and the vocabulary files it is built from.
//!
//! [`ClipTokenizer`] reproduces transformers' `CLIPTokenizer` on the `tokenizers` crate:
//! the same normalizer, pre-tokenizer and BPE model, the special tokens of the model
//! folder's `special_tokens_map.json`, and the SD 2.x convention of padding with `!`.
//! [`write_tokenizer_files`] writes the `tokenizer/` folder of a diffusers model from
//! OpenAI's CLIP BPE file, which this crate embeds (see `assets/clip/README.md`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// The text encoder's context length: prompts are truncated and padded to it.
pub const MAX_TOKENS: usize = 77;
pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
pub const START_OF_TEXT_ID: i64 = 49406;
pub const END_OF_TEXT_ID: i64 = 49407;
/// SD 2.x pads with `!` (id 0) instead of `<|endoftext|>`; the text encoder was trained
/// that way, so the conditioning of every padded position depends on it.
pub const SD2_PAD_TOKEN: &str = "!";

/// CLIP's BPE file as OpenAI published it (shipped by open_clip; MIT License).
const CLIP_BPE_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
/// OpenAI's tokenizer keeps only this many lines after the header: 49152 tokens minus
/// the 512 byte symbols and the 2 special tokens.
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// transformers' CLIP pre-tokenizer pattern: contractions, letter runs, single digits
/// and punctuation runs. The special tokens come first because transformers lists
/// them there: a lower-cased `<|ENDOFTEXT|>` that escaped the added-token matcher is
/// then one piece rather than three.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The vocabulary of CLIP's tokenizer in id order and its BPE merges in rank order,
/// laid out as transformers' `vocab.json` and `merges.txt` are.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipBpeVocabulary {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

impl ClipBpeVocabulary {
    /// Builds the vocabulary from the embedded CLIP BPE file: the 256 byte symbols,
    /// the same with `</w>`, one token per merge, then the two special tokens.
    pub fn from_embedded_bpe() -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(CLIP_BPE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| Error::Tokenizer(format!("embedded CLIP BPE file: {e}")))?;
        // The first line is the file's version header, not a merge.
        let merges = text
            .split('\n')
            .skip(1)
            .take(CLIP_MERGES)
            .map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        Error::Tokenizer(format!("embedded CLIP BPE file: bad merge {line:?}"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if merges.len() != CLIP_MERGES {
            return Err(Error::Tokenizer(format!(
                "embedded CLIP BPE file: {} merges, expected {CLIP_MERGES}",
                merges.len()
            )));
        }
        let bytes: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
        let tokens = bytes
            .iter()
            .cloned()
            .chain(bytes.iter().map(|s| format!("{s}</w>")))
            .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
            .chain([START_OF_TEXT.to_string(), END_OF_TEXT.to_string()])
            .collect();
        Ok(Self { tokens, merges })
    }

    /// `vocab.json`: token → id, written in id order.
    pub fn vocab_json(&self) -> String {
        let entries: Vec<String> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| format!("{}:{id}", Value::from(token.as_str())))
            .collect();
        format!("{{{}}}", entries.join(","))
    }

    /// `merges.txt`: the version header transformers expects, then one merge a line.
    pub fn merges_txt(&self) -> String {
        let mut text = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            text.push_str(a);
            text.push(' ');
            text.push_str(b);
            text.push('\n');
        }
        text
    }
}

/// GPT-2's reversible byte → printable character map, in the order OpenAI's CLIP
/// vocabulary lists it: printable Latin-1 bytes keep their own character, the other
/// 68 bytes take the characters from U+0100 on.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let kept: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let moved = 256..(512 - kept.len() as u32);
    kept.into_iter()
        .chain(moved)
        .map(|c| char::from_u32(c).expect("below U+0200"))
        .collect()
}

/// Writes `vocab.json`, `merges.txt`, `tokenizer_config.json` and
/// `special_tokens_map.json` into `dir` (a model folder's `tokenizer/`,
/// created if missing) as a Stable Diffusion 2.1 diffusers folder has them: CLIP's
/// vocabulary, padding with `!`, 77 tokens, lower-casing.
pub fn write_tokenizer_files(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let vocabulary = ClipBpeVocabulary::from_embedded_bpe()?;
    // SD 2.1 ships its special tokens with `normalized: true`, so a prompt's
    // "<|ENDOFTEXT|>" is lower-cased into the special token; keep that behaviour.
    let special = |content: &str| {
        json!({
            "content": content,
            "lstrip": false,
            "normalized": true,
            "rstrip": false,
            "single_word": false,
        })
    };
    let added = |content: &str| {
        let mut token = special(content);
        token["__type"] = "AddedToken".into();
        token
    };
    let special_tokens_map = json!({
        "bos_token": special(START_OF_TEXT),
        "eos_token": special(END_OF_TEXT),
        "pad_token": SD2_PAD_TOKEN,
        "unk_token": special(END_OF_TEXT),
    });
    let tokenizer_config = json!({
        "add_prefix_space": false,
        "bos_token": added(START_OF_TEXT),
        "do_lower_case": true,
        "eos_token": added(END_OF_TEXT),
        "errors": "replace",
        "model_max_length": MAX_TOKENS,
        "pad_token": SD2_PAD_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added(END_OF_TEXT),
    });
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialize") + "\n";
    let files = [
        ("vocab.json", vocabulary.vocab_json()),
        ("merges.txt", vocabulary.merges_txt()),
        ("tokenizer_config.json", pretty(&tokenizer_config)),
        ("special_tokens_map.json", pretty(&special_tokens_map)),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// A prompt as the text encoder takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    /// `<|startoftext|>`, the prompt's tokens, `<|endoftext|>`, then padding:
    /// always [`MAX_TOKENS`] long.
    pub ids: Vec<i64>,
    /// Positions before the padding, both special tokens included.
    pub len: usize,
    /// How many positions the prompt would need without truncation.
    pub untruncated_len: usize,
    /// The prompt was cut to fit; `<|endoftext|>` still ends it, as in transformers.
    pub truncated: bool,
}

/// CLIP's BPE tokenizer, giving the ids transformers' `CLIPTokenizer` gives.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    pad_id: i64,
    /// The special tokens' texts: they are split out of a prompt before anything
    /// else, so a placeholder containing one could never be matched.
    special_texts: Vec<String>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Reads `tokenizer/` of a diffusers model folder: `vocab.json` and `merges.txt`,
    /// and the special tokens from `special_tokens_map.json` (else
    /// `tokenizer_config.json`) when present. Without either the pad token is `!`,
    /// as for SD 2.x.
    pub fn from_model_dir(model_dir: &Path) -> Result<Self> {
        Self::from_tokenizer_dir(&model_dir.join("tokenizer"))
    }

    /// As [`ClipTokenizer::from_model_dir`], given the `tokenizer/` folder itself.
    pub fn from_tokenizer_dir(dir: &Path) -> Result<Self> {
        let vocab = read_vocab(&dir.join("vocab.json"))?;
        let merges = read_merges(&dir.join("merges.txt"))?;
        let specials = SpecialTokens::read(dir)?;
        for (key, token) in specials.iter() {
            if !vocab.contains_key(&token.content) {
                return Err(Error::config(
                    &specials.source,
                    key,
                    format!("{:?} is not in vocab.json", token.content),
                ));
            }
        }
        let vocab: Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(specials.unk.content.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.display())))?;
        let regex = |p: &str| Error::Tokenizer(format!("pattern {p:?}: compiling"));
        let whitespace =
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|_| regex(r"\s+"))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|_| regex(CLIP_SPLIT_PATTERN))?;

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // The pad token is added as a special token too: transformers does, so SD 2.x's
        // `!` is always split out on its own ("wow!!" ends in two pad ids, not `!!`).
        let added: Vec<AddedToken> = specials.iter().map(|(_, t)| t.clone()).collect();
        tokenizer.add_special_tokens(&added);

        let pad_id = tokenizer
            .token_to_id(&specials.pad.content)
            .expect("checked against vocab.json above");
        for (token, id) in [
            (START_OF_TEXT, START_OF_TEXT_ID),
            (END_OF_TEXT, END_OF_TEXT_ID),
        ] {
            if tokenizer.token_to_id(token).map(i64::from) != Some(id) {
                return Err(Error::Tokenizer(format!(
                    "{}: {token} must have id {id}, as in CLIP's vocabulary",
                    dir.join("vocab.json").display()
                )));
            }
        }
        Ok(Self {
            tokenizer,
            pad_id: pad_id.into(),
            special_texts: added.into_iter().map(|t| t.content).collect(),
        })
    }

    /// The prompt's ids, truncated to [`MAX_TOKENS`] (keeping `<|endoftext|>` last)
    /// and padded, as `CLIPTokenizer(prompt, padding="max_length", max_length=77,
    /// truncation=True)` gives them.
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let content = self.content_ids(prompt)?;
        let room = MAX_TOKENS - 2;
        let kept = content.len().min(room);
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        ids.push(START_OF_TEXT_ID);
        ids.extend_from_slice(&content[..kept]);
        ids.push(END_OF_TEXT_ID);
        let len = ids.len();
        ids.resize(MAX_TOKENS, self.pad_id);
        Ok(TokenizedPrompt {
            ids,
            len,
            untruncated_len: content.len() + 2,
            truncated: content.len() > room,
        })
    }

    /// Adds `token` (e.g. `<concept>`) as a new whole token and returns its id; the
    /// first one added gets the base vocabulary size (49408 for CLIP). Like diffusers'
    /// textual inversion it is matched after lower-casing, anywhere in a prompt.
    pub fn add_placeholder(&mut self, token: &str) -> Result<i64> {
        if token.is_empty() || token.chars().any(char::is_whitespace) {
            return Err(Error::InvalidInput(format!(
                "placeholder token {token:?} must be non-empty and have no whitespace"
            )));
        }
        if let Some(special) = self
            .special_texts
            .iter()
            .find(|s| token.contains(s.as_str()))
        {
            return Err(Error::InvalidInput(format!(
                "placeholder token {token:?} contains the special token {special:?}, which \
                 prompts are split at first"
            )));
        }
        if let Some(id) = self.token_id(token) {
            return Err(Error::InvalidInput(format!(
                "placeholder token {token:?} is already in the vocabulary (id {id})"
            )));
        }
        self.tokenizer.add_tokens(&[AddedToken::from(token, false)]);
        self.token_id(token)
            .ok_or_else(|| Error::Tokenizer(format!("adding placeholder token {token:?} failed")))
    }

    /// The id of a vocabulary or added token, matched exactly (CLIP's word tokens end
    /// in `</w>`: `"dog</w>"`).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.tokenizer.token_to_id(token).map(i64::from)
    }

    /// Rows the text encoder's token embedding needs: the base vocabulary plus the
    /// placeholders added.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The id of `word` if CLIP reads it as exactly one token. CoRe initializes the
    /// concept's vector from its super-category word and compares prompts position by
    /// position, so that word must be a single token.
    pub fn single_token_id(&self, word: &str) -> Result<i64> {
        let encoding = self
            .tokenizer
            .encode(word, false)
            .map_err(|e| Error::Tokenizer(format!("{word:?}: {e}")))?;
        match encoding.get_ids() {
            [id] => Ok((*id).into()),
            _ => Err(Error::InvalidInput(format!(
                "{word:?} is not a single CLIP token: it reads as {} pieces {:?}",
                encoding.get_ids().len(),
                encoding.get_tokens()
            ))),
        }
    }

    /// The prompt's token ids with no special tokens, truncation or padding.
    fn content_ids(&self, prompt: &str) -> Result<Vec<i64>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| Error::Tokenizer(format!("{prompt:?}: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    serde_json::from_str(&read_text(path)?).map_err(|e| {
        Error::Tokenizer(format!(
            "{}: not a token → id JSON object ({e})",
            path.display()
        ))
    })
}

fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    read_text(path)?
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with("#version") && !line.is_empty())
        .map(|(n, line)| match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => Ok((a.to_string(), b.to_string())),
            _ => Err(Error::Tokenizer(format!(
                "{}: line {}: a merge is two symbols separated by one space, got {line:?}",
                path.display(),
                n + 1
            ))),
        })
        .collect()
}

/// The bos/eos/unk/pad tokens of a tokenizer folder, with the matching flags
/// transformers gives them.
struct SpecialTokens {
    /// The file they came from, for error messages.
    source: PathBuf,
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
}

impl SpecialTokens {
    /// transformers prefers `special_tokens_map.json` over `tokenizer_config.json`
    /// (SD 2's own files disagree on the pad token, and `!` from the former wins).
    fn read(dir: &Path) -> Result<Self> {
        let candidates = [
            dir.join("special_tokens_map.json"),
            dir.join("tokenizer_config.json"),
        ];
        let Some(source) = candidates.into_iter().find(|p| p.is_file()) else {
            let plain = |content: &str| AddedToken::from(content, true);
            return Ok(Self {
                source: dir.to_path_buf(),
                bos: plain(START_OF_TEXT),
                eos: plain(END_OF_TEXT),
                unk: plain(END_OF_TEXT),
                pad: plain(SD2_PAD_TOKEN),
            });
        };
        let json: Value = serde_json::from_str(&read_text(&source)?)
            .map_err(|e| Error::Tokenizer(format!("{}: not JSON ({e})", source.display())))?;
        let entry = |key: &str, default: &str| special_token(&source, key, json.get(key), default);
        Ok(Self {
            bos: entry("bos_token", START_OF_TEXT)?,
            eos: entry("eos_token", END_OF_TEXT)?,
            unk: entry("unk_token", END_OF_TEXT)?,
            pad: entry("pad_token", SD2_PAD_TOKEN)?,
            source,
        })
    }

    fn iter(&self) -> impl Iterator<Item = (&'static str, &AddedToken)> {
        [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("unk_token", &self.unk),
            ("pad_token", &self.pad),
        ]
        .into_iter()
    }
}

/// One special-token entry: a plain string (matched verbatim) or an `AddedToken`
/// object whose flags are honoured.
fn special_token(
    path: &Path,
    key: &str,
    value: Option<&Value>,
    default: &str,
) -> Result<AddedToken> {
    let flag = |obj: &serde_json::Map<String, Value>, name: &str| {
        obj.get(name).and_then(Value::as_bool).unwrap_or(false)
    };
    match value {
        None | Some(Value::Null) => Ok(AddedToken::from(default, true)),
        Some(Value::String(content)) => Ok(AddedToken::from(content.as_str(), true)),
        Some(Value::Object(obj)) => match obj.get("content").and_then(Value::as_str) {
            Some(content) => Ok(AddedToken::from(content, true)
                .normalized(flag(obj, "normalized"))
                .lstrip(flag(obj, "lstrip"))
                .rstrip(flag(obj, "rstrip"))
                .single_word(flag(obj, "single_word"))),
            None => Err(Error::config(
                path,
                format!("{key}.content"),
                "missing or not a string",
            )),
        },
        Some(other) => Err(Error::config(
            path,
            key,
            format!("expected a string or an object, got {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd2_tokenizer() -> (tempfile::TempDir, ClipTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_files(&dir.path().join("tokenizer")).unwrap();
        let tokenizer = ClipTokenizer::from_model_dir(dir.path()).unwrap();
        (dir, tokenizer)
    }

    #[test]
    fn vocabulary_has_clip_layout() {
        let v = ClipBpeVocabulary::from_embedded_bpe().unwrap();
        assert_eq!(v.tokens.len(), 49408);
        assert_eq!(v.merges.len(), 48894);
        assert_eq!(&v.tokens[..3], ["!", "\"", "#"]);
        // Byte 0 is not printable: it is the first of the moved bytes, U+0100.
        assert_eq!(v.tokens[188], "Ā");
        assert_eq!(v.tokens[256], "!</w>");
        assert_eq!(v.merges[0], ("i".to_string(), "n".to_string()));
        assert_eq!(v.tokens[512], "in");
        assert_eq!(v.tokens[49406], START_OF_TEXT);
        assert_eq!(v.tokens[49407], END_OF_TEXT);
        assert!(v.merges_txt().starts_with("#version: 0.2\ni n\nt h\n"));
        assert!(v.vocab_json().starts_with(r#"{"!":0,"\"":1,"#));
    }

    #[test]
    fn encodes_with_special_ids_and_sd2_padding() {
        let (_dir, tok) = sd2_tokenizer();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!(tok.pad_id(), 0);
        assert_eq!(tok.token_id("dog</w>"), Some(1929));
        let p = tok.encode("a photo of a Dog").unwrap();
        assert_eq!(&p.ids[..8], [49406, 320, 1125, 539, 320, 1929, 49407, 0]);
        assert_eq!((p.len, p.untruncated_len, p.truncated), (7, 7, false));
        assert_eq!(p.ids.len(), MAX_TOKENS);
        // `!` is the pad token and so always a token of its own.
        assert_eq!(
            &tok.encode("wow!!").unwrap().ids[..5],
            [49406, 2781, 0, 0, 49407]
        );
    }

    #[test]
    fn long_prompts_are_truncated_keeping_the_end_token() {
        let (_dir, tok) = sd2_tokenizer();
        let p = tok.encode(&"dog ".repeat(80)).unwrap();
        assert!(p.truncated);
        assert_eq!((p.len, p.untruncated_len), (77, 82));
        assert_eq!(p.ids[75], 1929);
        assert_eq!(p.ids[76], END_OF_TEXT_ID);
        let fits = tok.encode(&"dog ".repeat(75)).unwrap();
        assert!(!fits.truncated);
        assert_eq!(fits.len, 77);
    }

    #[test]
    fn placeholder_is_added_once_and_matched_whole() {
        let (_dir, mut tok) = sd2_tokenizer();
        let id = tok.add_placeholder("<concept>").unwrap();
        assert_eq!(id, 49408);
        assert_eq!(tok.vocab_size(), 49409);
        let p = tok.encode("a photo of a <concept> dog").unwrap();
        assert_eq!(
            &p.ids[..8],
            [49406, 320, 1125, 539, 320, 49408, 1929, 49407]
        );
        assert_eq!(tok.encode("a <concept>s").unwrap().ids[2], 49408);
        assert_eq!(tok.add_placeholder("<other>").unwrap(), 49409);
        for bad in [
            "<concept>",
            "dog</w>",
            "",
            "two words",
            "tab\there",
            "<wow!>",
        ] {
            assert!(tok.add_placeholder(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn single_token_words_are_told_apart() {
        let (_dir, tok) = sd2_tokenizer();
        assert_eq!(tok.single_token_id("dog").unwrap(), 1929);
        assert_eq!(tok.single_token_id(" Dog ").unwrap(), 1929);
        let err = tok.single_token_id("teapots").unwrap_err().to_string();
        assert!(
            err.contains("\"teapots\"") && err.contains("pieces"),
            "{err}"
        );
    }

    #[test]
    fn pad_token_follows_the_special_tokens_map() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_files(&dir.path().join("tokenizer")).unwrap();
        let map = dir.path().join("tokenizer/special_tokens_map.json");
        std::fs::write(&map, r#"{"pad_token": "<|endoftext|>"}"#).unwrap();
        let tok = ClipTokenizer::from_model_dir(dir.path()).unwrap();
        assert_eq!(tok.pad_id(), END_OF_TEXT_ID);
        assert_eq!(
            tok.encode("wow!!").unwrap().ids[..4],
            [49406, 2781, 748, 49407]
        );

        std::fs::write(&map, r#"{"pad_token": "<|nothing|>"}"#).unwrap();
        let err = ClipTokenizer::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("special_tokens_map.json") && err.contains("pad_token"),
            "{err}"
        );
    }

    #[test]
    fn broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = ClipTokenizer::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocab.json"), "{err}");

        write_tokenizer_files(&dir.path().join("tokenizer")).unwrap();
        let merges = dir.path().join("tokenizer/merges.txt");
        std::fs::write(&merges, "#version: 0.2\ni n\nt h x\n").unwrap();
        let err = ClipTokenizer::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("merges.txt") && err.contains("line 3"),
            "{err}"
        );

        std::fs::write(dir.path().join("tokenizer/vocab.json"), "[1, 2]").unwrap();
        let err = ClipTokenizer::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocab.json"), "{err}");
    }
}
