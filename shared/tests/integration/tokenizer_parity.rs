//! The CLIP tokenizer against transformers' `CLIPTokenizer` on the same folder.
//!
//! The test writes a tokenizer folder with `write_tokenizer_files`; the Python reference
//! (`tests/reference/tokenize_reference.py`) first checks its vocabulary against one
//! built independently from open_clip's BPE file, then tokenizes every prompt. Ids must
//! be equal on every line of the project's prompt sets (`shared/assets/prompts/`), with the concept slot filled several ways, and on hard cases:
//! punctuation runs, apostrophes, unicode, numbers, odd whitespace, over-long prompts,
//! special-token look-alikes and the added placeholder token.

use std::path::PathBuf;

use coreg::model::tokenizer::{write_tokenizer_files, ClipTokenizer, MAX_TOKENS};
use coreg_test_support::reference::{read, run_reference, workspace_root};

const PLACEHOLDER: &str = "<concept>";

/// Every template of the prompt sets, `{}` filled with a one-token word, the
/// placeholder, and a multi-token capitalized phrase.
fn prompt_set_lines() -> Vec<String> {
    let dir: PathBuf = workspace_root().join("shared/assets/prompts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the prompt sets are expected in {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no prompt files in {}", dir.display());
    let mut prompts = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            for word in ["dog", PLACEHOLDER, "Teddy-Bear"] {
                prompts.push(line.replace("{}", word));
            }
        }
    }
    prompts
}

fn hard_cases() -> Vec<String> {
    let mut cases: Vec<String> = [
        // `!` is SD 2.x's pad token, so transformers always splits it out.
        "wow!!",
        "?!?",
        "!!!",
        "hello ! world!",
        "...and then,,, ;-) :D",
        "it's",
        "dog's",
        "IT'S THE DOG'S",
        "we're they've I'm you'll he'd",
        "dog'sss ''quoted'' `back`",
        "café naïve résumé Crème Brûlée",
        "e\u{301}cole",
        "Straße ΣΟΦΙΑ İstanbul",
        "日本の犬と猫",
        "한국어 텍스트",
        "🐶🐱 emoji 👍🏽 ❤️",
        "123 4.5",
        "2024-01-01 1,000,000 ½ ² ٣",
        "\ta\tdog\t",
        "   leading spaces",
        "trailing spaces   ",
        "line one\nline two\r\nline three",
        "",
        " ",
        "non\u{a0}breaking and ideographic\u{3000}space",
        "<|endoftext|> x",
        "<|startoftext|>",
        "<|ENDOFTEXT|> upper",
        "a<|endoftext|>b",
        "<b>bold</b> &amp; a_b-c.d/e\\f",
        "<concept>",
        "<CONCEPT> dog",
        "<concept><concept> a<concept>b",
        "< concept >",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    cases.push("dog ".repeat(75));
    cases.push("dog ".repeat(76));
    cases.push("a photo of a dog, ".repeat(20));
    cases.push(format!("{} wow!!", "cat ".repeat(74)));
    cases
}

#[test]
fn ids_equal_transformers_clip_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_dir = dir.path().join("tokenizer");
    write_tokenizer_files(&tokenizer_dir).unwrap();

    let mut prompts = prompt_set_lines();
    let from_sets = prompts.len();
    prompts.extend(hard_cases());
    let prompts_path = dir.path().join("prompts.json");
    std::fs::write(&prompts_path, serde_json::to_string(&prompts).unwrap()).unwrap();
    let out = dir.path().join("ids.safetensors");
    run_reference(
        "tokenize_reference",
        &[
            "--tokenizer-dir",
            tokenizer_dir.to_str().unwrap(),
            "--prompts",
            prompts_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--placeholder",
            PLACEHOLDER,
        ],
    );
    let reference = read(&out);
    let want_ids = &reference["input_ids"];
    let want_lengths = Vec::<i64>::try_from(&reference["lengths"]).unwrap();
    assert_eq!(want_ids.size(), [prompts.len() as i64, MAX_TOKENS as i64]);

    let mut tokenizer = ClipTokenizer::from_model_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.add_placeholder(PLACEHOLDER).unwrap(), 49408);
    let mut mismatches = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let got = tokenizer.encode(prompt).unwrap();
        let want = Vec::<i64>::try_from(want_ids.get(i as i64)).unwrap();
        let want_len = want_lengths[i] as usize;
        if got.ids != want
            || got.untruncated_len != want_len
            || got.truncated != (want_len > MAX_TOKENS)
        {
            mismatches.push(format!(
                "{prompt:?}\n  rust:         {:?} (untruncated {})\n  \
                 transformers: {want:?} (untruncated {want_len})",
                got.ids, got.untruncated_len
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} prompts ({from_sets} from the prompt sets) differ:\n{}",
        mismatches.len(),
        prompts.len(),
        mismatches.join("\n")
    );
}

/// `coreg model tokenize` writes one row per line of its prompts file, equal to the
/// library's ids (checked against transformers above), and warns about truncation.
#[test]
fn cli_tokenizes_one_row_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_coreg"))
        .args(["model", "init", "--out", model.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let long = "very ".repeat(100);
    let lines = ["a photo of a dog", "", &long, "A CAT!! on the moon"];
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("ids.safetensors");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_coreg"))
        .args(["model", "tokenize", "--model"])
        .arg(&model)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("truncated"),
        "{stderr}"
    );

    let ids = &read(&out)["input_ids"];
    assert_eq!(ids.size(), [lines.len() as i64, MAX_TOKENS as i64]);
    let tokenizer = ClipTokenizer::from_model_dir(&model).unwrap();
    for (i, line) in lines.iter().enumerate() {
        let want = tokenizer.encode(line).unwrap().ids;
        assert_eq!(
            Vec::<i64>::try_from(ids.get(i as i64)).unwrap(),
            want,
            "line {}",
            i + 1
        );
    }
}
