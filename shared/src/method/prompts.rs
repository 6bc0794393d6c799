//! Prompt templates: the training prompt and the regularization prompt sets CoRe draws
//! one template from per step (docs/method.md, "Stage 1" step 2).
//!
//! A template holds exactly one `{}`, filled with the concept's placeholder token (y*)
//! or with its super-category word (y_cat).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The diffusion loss's prompt in both stages.
pub const TRAINING_TEMPLATE: &str = "a photo of a {}";

/// Where the concept (or its category word) goes in a template.
pub const SLOT: &str = "{}";

/// The most templates a custom prompt set may hold: ten times the paper's 100, enough
/// for any real set while bounding what a job file can make the trainer tokenize.
pub const MAX_CUSTOM_TEMPLATES: usize = 1000;

/// The longest custom template in bytes. CLIP reads at most 77 tokens, which no
/// sensible prompt turns into more than a few hundred bytes; the token limit itself is
/// checked when the template is tokenized (`ContextPair::new`).
pub const MAX_TEMPLATE_BYTES: usize = 1000;

const ANIMATE: &str = include_str!("../../assets/prompts/animate.txt");
const INANIMATE: &str = include_str!("../../assets/prompts/inanimate.txt");
const UNIVERSAL: &str = include_str!("../../assets/prompts/universal.txt");

/// Which prompt set a job regularizes with, by the name job files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptSetKind {
    /// The reference implementation's set for pets, dolls and people (97 templates).
    Animate,
    /// Its set for objects (103 templates).
    Inanimate,
    /// Its smaller mixed set (50 templates).
    Universal,
    /// Only [`TRAINING_TEMPLATE`]: the paper's "without the prompt set" ablation.
    Single,
    /// Templates the user supplies.
    Custom,
}

impl PromptSetKind {
    pub const ALL: [PromptSetKind; 5] = [
        PromptSetKind::Animate,
        PromptSetKind::Inanimate,
        PromptSetKind::Universal,
        PromptSetKind::Single,
        PromptSetKind::Custom,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PromptSetKind::Animate => "animate",
            PromptSetKind::Inanimate => "inanimate",
            PromptSetKind::Universal => "universal",
            PromptSetKind::Single => "single",
            PromptSetKind::Custom => "custom",
        }
    }
}

impl fmt::Display for PromptSetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PromptSetKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown prompt set {s:?} (expected animate, inanimate, universal, single or custom)"
                ))
            })
    }
}

/// A non-empty list of templates, each with exactly one `{}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptSet {
    #[serde(rename = "prompt_set")]
    kind: PromptSetKind,
    #[serde(rename = "prompt_templates")]
    templates: Vec<String>,
}

impl PromptSet {
    pub fn animate() -> Self {
        Self::embedded(PromptSetKind::Animate, ANIMATE)
    }

    pub fn inanimate() -> Self {
        Self::embedded(PromptSetKind::Inanimate, INANIMATE)
    }

    pub fn universal() -> Self {
        Self::embedded(PromptSetKind::Universal, UNIVERSAL)
    }

    /// Regularize on the training prompt alone (the "w/o prompt set" ablation).
    pub fn single_photo() -> Self {
        Self {
            kind: PromptSetKind::Single,
            templates: vec![TRAINING_TEMPLATE.to_string()],
        }
    }

    /// The shipped set `kind` names; a custom set has no shipped templates and is
    /// refused (build it with [`PromptSet::custom`]).
    pub fn builtin(kind: PromptSetKind) -> Result<Self> {
        match kind {
            PromptSetKind::Animate => Ok(Self::animate()),
            PromptSetKind::Inanimate => Ok(Self::inanimate()),
            PromptSetKind::Universal => Ok(Self::universal()),
            PromptSetKind::Single => Ok(Self::single_photo()),
            PromptSetKind::Custom => Err(Error::InvalidInput(
                "a custom prompt set needs its templates".into(),
            )),
        }
    }

    /// A user-supplied set: 1 to [`MAX_CUSTOM_TEMPLATES`] templates, each non-blank, at
    /// most [`MAX_TEMPLATE_BYTES`] long and holding exactly one `{}`. Surrounding
    /// whitespace is trimmed.
    pub fn custom(templates: Vec<String>) -> Result<Self> {
        if templates.is_empty() {
            return Err(Error::InvalidInput(
                "a custom prompt set needs at least one template".into(),
            ));
        }
        if templates.len() > MAX_CUSTOM_TEMPLATES {
            return Err(Error::InvalidInput(format!(
                "a custom prompt set holds at most {MAX_CUSTOM_TEMPLATES} templates, got {}",
                templates.len()
            )));
        }
        let templates = templates
            .into_iter()
            .enumerate()
            .map(|(n, template)| {
                let trimmed = template.trim();
                if trimmed.len() > MAX_TEMPLATE_BYTES {
                    return Err(Error::InvalidInput(format!(
                        "template {} is {} bytes long, at most {MAX_TEMPLATE_BYTES} are allowed: {:?}…",
                        n + 1,
                        trimmed.len(),
                        trimmed.chars().take(60).collect::<String>()
                    )));
                }
                check_template(trimmed)
                    .map_err(|e| Error::InvalidInput(format!("template {}: {e}", n + 1)))?;
                Ok(trimmed.to_string())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kind: PromptSetKind::Custom,
            templates,
        })
    }

    pub fn kind(&self) -> PromptSetKind {
        self.kind
    }

    pub fn templates(&self) -> &[String] {
        &self.templates
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Always false: every constructor refuses an empty set.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// Template `index` with its `{}` replaced by `word`.
    ///
    /// # Panics
    /// If `index >= self.len()`, like slice indexing (callers draw indices in range).
    pub fn fill(&self, index: usize, word: &str) -> String {
        fill_template(&self.templates[index], word)
    }

    /// The shipped files are one template per line and all valid (a unit test checks).
    fn embedded(kind: PromptSetKind, text: &str) -> Self {
        Self {
            kind,
            templates: text
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(String::from)
                .collect(),
        }
    }
}

/// Ok if `template` is non-blank and holds exactly one `{}`; the error quotes it.
pub fn check_template(template: &str) -> Result<()> {
    if template.trim().is_empty() {
        return Err(Error::InvalidInput("a template must not be blank".into()));
    }
    match template.matches(SLOT).count() {
        1 => Ok(()),
        n => Err(Error::InvalidInput(format!(
            "{template:?} must hold exactly one {SLOT} where the concept goes, it holds {n}"
        ))),
    }
}

/// `template` with its `{}` replaced by `word` (every `{}`, should there be several:
/// [`check_template`] is what refuses those).
pub fn fill_template(template: &str, word: &str) -> String {
    template.replace(SLOT, word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_sets_have_their_sizes_and_valid_templates() {
        for (set, len) in [
            (PromptSet::animate(), 97),
            (PromptSet::inanimate(), 103),
            (PromptSet::universal(), 50),
            (PromptSet::single_photo(), 1),
        ] {
            assert_eq!(set.len(), len, "{}", set.kind());
            for template in set.templates() {
                check_template(template).unwrap();
                assert_eq!(template.trim(), template);
            }
            assert_eq!(PromptSet::builtin(set.kind()).unwrap(), set);
        }
        assert_eq!(
            PromptSet::animate().fill(0, "dog"),
            "a dog on a busy city street with neon lights flashing in the background"
        );
        assert_eq!(PromptSet::single_photo().fill(0, "<c>"), "a photo of a <c>");
        assert!(PromptSet::builtin(PromptSetKind::Custom).is_err());
    }

    #[test]
    fn custom_sets_are_validated_naming_the_template() {
        let set =
            PromptSet::custom(vec![" a {} in the snow ".into(), "{} at night".into()]).unwrap();
        assert_eq!(set.kind(), PromptSetKind::Custom);
        assert_eq!(set.templates(), ["a {} in the snow", "{} at night"]);
        assert_eq!(set.fill(1, "cat"), "cat at night");

        let err = |templates: Vec<&str>| {
            PromptSet::custom(templates.into_iter().map(String::from).collect())
                .unwrap_err()
                .to_string()
        };
        assert!(err(vec![]).contains("at least one"));
        let e = err(vec!["a {} ok", "a photo of a dog"]);
        assert!(
            e.contains("template 2") && e.contains("\"a photo of a dog\"") && e.contains("holds 0"),
            "{e}"
        );
        let e = err(vec!["{} and {}"]);
        assert!(e.contains("\"{} and {}\"") && e.contains("holds 2"), "{e}");
        assert!(err(vec!["a {}", "   "]).contains("template 2"));
        let long = format!("a {{}} {}", "x".repeat(MAX_TEMPLATE_BYTES));
        let e = err(vec![&long]);
        assert!(e.contains("template 1") && e.contains("bytes"), "{e}");
        let many = vec!["a {}"; MAX_CUSTOM_TEMPLATES + 1];
        assert!(err(many).contains("at most 1000"));
        assert_eq!(
            PromptSet::custom(vec!["a {}".into(); MAX_CUSTOM_TEMPLATES])
                .unwrap()
                .len(),
            MAX_CUSTOM_TEMPLATES
        );
    }

    #[test]
    fn kinds_have_job_file_names() {
        for kind in PromptSetKind::ALL {
            assert_eq!(kind.to_string().parse::<PromptSetKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<PromptSetKind>(&json).unwrap(), kind);
        }
        let e = "Animals".parse::<PromptSetKind>().unwrap_err().to_string();
        assert!(e.contains("\"Animals\""), "{e}");
    }
}
