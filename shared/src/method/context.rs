//! The pair of prompts CoRe compares: a template filled with the concept's placeholder
//! token (y*) and with its super-category word (y_cat), and the token positions whose
//! text embeddings and cross-attention the two must share — the concept's *context*.

use tch::{Kind, Tensor};

use crate::method::prompts::{check_template, fill_template, PromptSet};
use crate::model::tokenizer::{ClipTokenizer, END_OF_TEXT_ID, MAX_TOKENS, START_OF_TEXT_ID};
use crate::{Error, Result};

/// y* and y_cat as token ids, aligned position by position.
#[derive(Debug)]
pub struct ContextPair {
    /// y*: i64 [1, 77], the placeholder id at `concept_position`.
    pub concept_ids: Tensor,
    /// y_cat: i64 [1, 77], the category word's id at `concept_position`.
    pub reference_ids: Tensor,
    pub concept_position: i64,
    /// The context positions, i64 `[K]` ascending: the start token (position 0) through
    /// the `<|endoftext|>` token inclusive, without the concept position and without
    /// padding (docs/method.md, "Stage 1" step 3).
    pub kept_positions: Tensor,
}

impl ContextPair {
    /// Fills `template` with `placeholder` (already added to `tokenizer`) and with
    /// `category`, and tokenizes both. The category must be a single CLIP token, so that
    /// the two prompts align position by position; a filled prompt longer than 77
    /// tokens is refused rather than truncated, since truncation would cut the end
    /// token out of the context.
    pub fn new(
        tokenizer: &ClipTokenizer,
        template: &str,
        placeholder: &str,
        category: &str,
    ) -> Result<Self> {
        check_template(template)?;
        let placeholder_id = tokenizer.token_id(placeholder).ok_or_else(|| {
            Error::InvalidInput(format!(
                "the placeholder token {placeholder:?} has not been added to the tokenizer"
            ))
        })?;
        tokenizer.single_token_id(category).map_err(|e| {
            Error::InvalidInput(format!(
                "the super-category {category:?} must be a single CLIP token: {e}"
            ))
        })?;
        let encode = |word: &str| -> Result<Vec<i64>> {
            let prompt = fill_template(template, word);
            let tokens = tokenizer.encode(&prompt)?;
            if tokens.truncated {
                return Err(Error::InvalidInput(format!(
                    "the prompt {prompt:?} is {} CLIP tokens long; at most {MAX_TOKENS} fit",
                    tokens.untruncated_len
                )));
            }
            Ok(tokens.ids)
        };
        let concept = encode(placeholder)?;
        let reference = encode(category.trim())?;
        Self::from_slices(&concept, &reference, placeholder_id).map_err(|e| {
            Error::InvalidInput(format!(
                "template {template:?} with {placeholder:?} and {category:?}: {e}"
            ))
        })
    }

    /// One pair per template of `set`, so that a template that cannot be used is
    /// reported before training starts.
    pub fn for_prompt_set(
        tokenizer: &ClipTokenizer,
        set: &PromptSet,
        placeholder: &str,
        category: &str,
    ) -> Result<Vec<Self>> {
        set.templates()
            .iter()
            .map(|template| Self::new(tokenizer, template, placeholder, category))
            .collect()
    }

    /// A pair from ids that are already tokenized: i64 [1, 77] each (or `[77]`), starting
    /// with `<|startoftext|>`, with the end token at the same position in both, and
    /// differing at exactly one position where `concept_ids` holds `placeholder_id`.
    pub fn from_ids(
        concept_ids: &Tensor,
        reference_ids: &Tensor,
        placeholder_id: i64,
    ) -> Result<Self> {
        let rows = |name: &str, ids: &Tensor| -> Result<Vec<i64>> {
            let size = ids.size();
            let fits = size == [MAX_TOKENS as i64] || size == [1, MAX_TOKENS as i64];
            if ids.kind() != Kind::Int64 || !fits {
                return Err(Error::InvalidInput(format!(
                    "{name} must be i64 [1, {MAX_TOKENS}], got {:?} {size:?}",
                    ids.kind()
                )));
            }
            Ok(Vec::<i64>::try_from(ids.flatten(0, -1))?)
        };
        Self::from_slices(
            &rows("concept ids", concept_ids)?,
            &rows("reference ids", reference_ids)?,
            placeholder_id,
        )
    }

    fn from_slices(concept: &[i64], reference: &[i64], placeholder_id: i64) -> Result<Self> {
        let invalid = |message: String| Err(Error::InvalidInput(message));
        for (name, ids) in [("concept", concept), ("reference", reference)] {
            if ids.first() != Some(&START_OF_TEXT_ID) {
                return invalid(format!(
                    "the {name} prompt does not start with <|startoftext|> ({START_OF_TEXT_ID})"
                ));
            }
        }
        let end = |ids: &[i64]| ids.iter().position(|&id| id == END_OF_TEXT_ID);
        let end = match (end(concept), end(reference)) {
            (Some(c), Some(r)) if c == r => c,
            (Some(c), Some(r)) => {
                return invalid(format!(
                    "the prompts end at different positions ({c} and {r}): the category \
                     word must take exactly one token where the placeholder does"
                ))
            }
            _ => return invalid("a prompt has no <|endoftext|> token".into()),
        };
        let differing: Vec<usize> = (0..concept.len())
            .filter(|&i| concept[i] != reference[i])
            .collect();
        let position = match differing[..] {
            [position] if position < end => position,
            _ => {
                return invalid(format!(
                    "the prompts must differ at exactly one position before the end token, \
                     they differ at {differing:?}"
                ))
            }
        };
        if concept[position] != placeholder_id {
            return invalid(format!(
                "the concept prompt holds {} where it differs from the reference, not the \
                 placeholder id {placeholder_id}",
                concept[position]
            ));
        }
        if reference[..=end].contains(&placeholder_id) {
            return invalid(format!(
                "the reference prompt holds the placeholder id {placeholder_id} too"
            ));
        }
        let kept: Vec<i64> = (0..=end as i64).filter(|&i| i != position as i64).collect();
        let row = |ids: &[i64]| Tensor::from_slice(ids).view([1, -1]);
        Ok(Self {
            concept_ids: row(concept),
            reference_ids: row(reference),
            concept_position: position as i64,
            kept_positions: Tensor::from_slice(&kept),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::write_tokenizer_files;

    fn tokenizer() -> (tempfile::TempDir, ClipTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_files(&dir.path().join("tokenizer")).unwrap();
        let mut tokenizer = ClipTokenizer::from_model_dir(dir.path()).unwrap();
        tokenizer.add_placeholder("<concept>").unwrap();
        (dir, tokenizer)
    }

    fn values(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn kept_positions_are_the_context_from_start_to_end_token() {
        let (_dir, tok) = tokenizer();
        // <sot> a photo of a <concept> <eot> ! ! …
        let pair = ContextPair::new(&tok, "a photo of a {}", "<concept>", "dog").unwrap();
        assert_eq!(pair.concept_position, 5);
        assert_eq!(values(&pair.kept_positions), [0, 1, 2, 3, 4, 6]);
        let concept = values(&pair.concept_ids);
        let reference = values(&pair.reference_ids);
        assert_eq!(&concept[..8], [49406, 320, 1125, 539, 320, 49408, 49407, 0]);
        assert_eq!(
            &reference[..8],
            [49406, 320, 1125, 539, 320, 1929, 49407, 0]
        );
        assert_eq!(pair.concept_ids.size(), [1, 77]);

        // Mid-prompt: everything up to and including the end token but the concept.
        let pair = ContextPair::new(&tok, "{} in the snow", "<concept>", " Dog").unwrap();
        assert_eq!(pair.concept_position, 1);
        assert_eq!(values(&pair.kept_positions), [0, 2, 3, 4, 5]);
    }

    #[test]
    fn from_ids_checks_alignment() {
        let (_dir, tok) = tokenizer();
        let pair = ContextPair::new(&tok, "a {} on a hill", "<concept>", "cat").unwrap();
        let again = ContextPair::from_ids(&pair.concept_ids, &pair.reference_ids, 49408).unwrap();
        assert_eq!(again.concept_position, pair.concept_position);
        assert_eq!(values(&again.kept_positions), values(&pair.kept_positions));

        let err = |c: &Tensor, r: &Tensor, id: i64| {
            ContextPair::from_ids(c, r, id).unwrap_err().to_string()
        };
        // Wrong placeholder id.
        assert!(err(&pair.concept_ids, &pair.reference_ids, 49409).contains("49409"));
        // Identical prompts differ nowhere.
        assert!(err(&pair.reference_ids, &pair.reference_ids, 49408).contains("exactly one"));
        // A second differing position.
        let two = pair.reference_ids.copy();
        let _ = two.narrow(1, 4, 1).fill_(1929);
        assert!(err(&pair.concept_ids, &two, 49408).contains("[2, 4]"));
        // End tokens at different positions.
        let shifted = pair.reference_ids.roll([1], [1]);
        let _ = shifted.narrow(1, 0, 1).fill_(START_OF_TEXT_ID);
        assert!(err(&pair.concept_ids, &shifted, 49408).contains("end at different"));
        // Shapes and kinds.
        let floats = pair.concept_ids.to_kind(Kind::Float);
        assert!(err(&floats, &pair.reference_ids, 49408).contains("i64 [1, 77]"));
        let short = pair.concept_ids.narrow(1, 0, 10);
        assert!(err(&short, &pair.reference_ids, 49408).contains("[1, 10]"));
    }

    #[test]
    fn multi_token_category_is_refused_naming_the_word() {
        let (_dir, tok) = tokenizer();
        let e = ContextPair::new(&tok, "a photo of a {}", "<concept>", "teapots")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"teapots\"") && e.contains("single CLIP token"),
            "{e}"
        );
    }

    #[test]
    fn bad_templates_and_placeholders_are_refused() {
        let (_dir, tok) = tokenizer();
        let long = format!("{} {{}}", "dog ".repeat(80));
        let e = ContextPair::new(&tok, &long, "<concept>", "dog")
            .unwrap_err()
            .to_string();
        assert!(e.contains("83 CLIP tokens"), "{e}");
        let e = ContextPair::new(&tok, "a photo", "<concept>", "dog")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one {}"), "{e}");
        let e = ContextPair::new(&tok, "a {}", "<other>", "dog")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"<other>\"") && e.contains("not been added"),
            "{e}"
        );
        // "a {}s" reads "dogs" as one token but "<concept>s" as two: no alignment.
        let e = ContextPair::new(&tok, "two {}s", "<concept>", "dog")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"two {}s\""), "{e}");
    }

    #[test]
    fn every_shipped_template_makes_a_pair() {
        let (_dir, tok) = tokenizer();
        for set in [
            PromptSet::animate(),
            PromptSet::inanimate(),
            PromptSet::universal(),
        ] {
            let pairs = ContextPair::for_prompt_set(&tok, &set, "<concept>", "dog").unwrap();
            assert_eq!(pairs.len(), set.len());
        }
    }
}
