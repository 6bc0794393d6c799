//! The learned concept embedding S*, in the two layouts other tools read.
//!
//! - diffusers' `learned_embeds.safetensors`: one tensor named by the placeholder token,
//!   `[n, D]` fp32 (n = 1 here). `StableDiffusionPipeline.load_textual_inversion` takes
//!   the single key as the token and adds it to the tokenizer.
//! - AUTOMATIC1111: one tensor under the key `emb_params`, `[n, D]`. The web UI names
//!   the embedding after the file and accepts any single-tensor safetensors file, and
//!   the tools around it (ComfyUI nodes, kohya scripts) look for `emb_params`.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::artifact::tensor_file::{self, corrupt};
use crate::{Error, Result};

/// The key AUTOMATIC1111-style embedding files keep their vectors under.
pub const A1111_KEY: &str = "emb_params";

const LEARNED_EMBEDS: &str = "learned_embeds.safetensors";
const A1111_FILE: &str = "AUTOMATIC1111 embedding";

/// One placeholder token and its input embedding vector.
#[derive(Debug)]
pub struct LearnedEmbedding {
    token: String,
    /// `[1, D]` fp32 on the CPU.
    vectors: Tensor,
}

impl LearnedEmbedding {
    /// `vector` is `[D]` or `[1, D]`, of any float kind and device; it is copied (fp32,
    /// CPU, detached). Refuses an empty or whitespace-holding token (the tokenizer
    /// would split it) and non-finite values (a diverged run must not be stored).
    pub fn new(token: &str, vector: &Tensor) -> Result<LearnedEmbedding> {
        check_token(token).map_err(Error::InvalidInput)?;
        let vectors = one_vector(vector).map_err(Error::InvalidInput)?;
        Ok(LearnedEmbedding {
            token: token.to_owned(),
            vectors,
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The embedding vector, `[D]` fp32 on the CPU.
    pub fn vector(&self) -> Tensor {
        self.vectors.get(0)
    }

    /// The embedding width D (1024 for SD 2.1).
    pub fn dim(&self) -> i64 {
        self.vectors.size()[1]
    }

    /// diffusers' `learned_embeds.safetensors` bytes: `{token: [1, D]}`.
    pub fn to_learned_embeds(&self) -> Result<Vec<u8>> {
        tensor_file::encode(&[(self.token.clone(), &self.vectors)], torch_format())
    }

    /// Reads a `learned_embeds.safetensors`, checking it holds exactly one fp32 token
    /// embedding `[1, D]` (or `[D]`) of finite values.
    pub fn from_learned_embeds(bytes: &[u8]) -> Result<LearnedEmbedding> {
        let (tensors, _) = tensor_file::decode(LEARNED_EMBEDS, bytes)?;
        let mut tensors = tensors.into_iter();
        let (Some((token, tensor)), None) = (tensors.next(), tensors.next()) else {
            return Err(corrupt(
                LEARNED_EMBEDS,
                "expected exactly one tensor (the placeholder token's embedding)",
            ));
        };
        Self::checked(LEARNED_EMBEDS, &token, &tensor)
    }

    /// AUTOMATIC1111-compatible bytes: `{emb_params: [1, D]}`; the web UI takes the
    /// prompt word from the file name, so save it as `<token>.safetensors`.
    pub fn to_a1111(&self) -> Result<Vec<u8>> {
        let mut metadata = torch_format();
        metadata.insert("name".to_owned(), self.token.clone());
        tensor_file::encode(&[(A1111_KEY.to_owned(), &self.vectors)], metadata)
    }

    /// Reads an AUTOMATIC1111 `.safetensors` embedding (`emb_params`, one vector) as
    /// the embedding of `token`.
    pub fn from_a1111(token: &str, bytes: &[u8]) -> Result<LearnedEmbedding> {
        check_token(token).map_err(Error::InvalidInput)?;
        let (tensors, _) = tensor_file::decode(A1111_FILE, bytes)?;
        match (tensors.get(A1111_KEY), tensors.len()) {
            (Some(tensor), 1) => Self::checked(A1111_FILE, token, tensor),
            _ => Err(corrupt(
                A1111_FILE,
                format!("expected exactly one tensor, `{A1111_KEY}`"),
            )),
        }
    }

    /// Validation on read: stored data that breaks the layout is corrupt, not bad input.
    fn checked(what: &str, token: &str, tensor: &Tensor) -> Result<LearnedEmbedding> {
        if tensor.kind() != Kind::Float {
            return Err(corrupt(
                what,
                format!("dtype is {:?}, expected fp32", tensor.kind()),
            ));
        }
        check_token(token).map_err(|m| corrupt(what, m))?;
        let vectors = one_vector(tensor).map_err(|m| corrupt(what, m))?;
        Ok(LearnedEmbedding {
            token: token.to_owned(),
            vectors,
        })
    }
}

/// safetensors.torch writes this marker; transformers checks it on model files.
fn torch_format() -> HashMap<String, String> {
    HashMap::from([("format".to_owned(), "pt".to_owned())])
}

fn check_token(token: &str) -> std::result::Result<(), String> {
    if token.is_empty() || token.chars().any(char::is_whitespace) || token.len() > 128 {
        return Err(format!(
            "placeholder token {token:?} must be 1–128 bytes without whitespace"
        ));
    }
    Ok(())
}

/// `[D]` or `[1, D]` → `[1, D]` fp32 CPU copy with finite values.
fn one_vector(tensor: &Tensor) -> std::result::Result<Tensor, String> {
    let shape = tensor.size();
    let dim = match shape[..] {
        [d] | [1, d] if d > 0 => d,
        _ => {
            return Err(format!(
                "embedding has shape {shape:?}, expected one vector ([D] or [1, D])"
            ))
        }
    };
    if !tensor.is_floating_point() {
        return Err(format!(
            "embedding dtype {:?} is not a float",
            tensor.kind()
        ));
    }
    let vectors = tensor
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .reshape([1, dim])
        .copy();
    if vectors.isfinite().all().int64_value(&[]) != 1 {
        return Err("embedding holds NaN or infinite values".to_owned());
    }
    Ok(vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> Tensor {
        Tensor::from_slice(&[0.25f32, -1.5, 3.0, 1e-7])
    }

    #[test]
    fn both_layouts_round_trip_bit_exactly() {
        let embedding = LearnedEmbedding::new("<sks>", &vector()).unwrap();
        assert_eq!(embedding.dim(), 4);
        let diffusers =
            LearnedEmbedding::from_learned_embeds(&embedding.to_learned_embeds().unwrap()).unwrap();
        assert_eq!(diffusers.token(), "<sks>");
        assert!(diffusers.vector().equal(&vector()));
        let a1111 = LearnedEmbedding::from_a1111("<sks>", &embedding.to_a1111().unwrap()).unwrap();
        assert!(a1111.vector().equal(&vector()));
    }

    #[test]
    fn the_layouts_name_their_tensor_as_other_tools_expect() {
        let embedding = LearnedEmbedding::new("<sks>", &vector().view([1, 4])).unwrap();
        let (tensors, _) =
            tensor_file::decode("t", &embedding.to_learned_embeds().unwrap()).unwrap();
        assert_eq!(tensors.keys().collect::<Vec<_>>(), ["<sks>"]);
        assert_eq!(tensors["<sks>"].size(), [1, 4]);
        let (tensors, metadata) = tensor_file::decode("t", &embedding.to_a1111().unwrap()).unwrap();
        assert_eq!(tensors.keys().collect::<Vec<_>>(), [A1111_KEY]);
        assert_eq!(metadata["name"], "<sks>");
    }

    #[test]
    fn invalid_embeddings_are_refused() {
        let two = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(
            LearnedEmbedding::new("<a>", &two),
            Err(Error::InvalidInput(_))
        ));
        let nan = Tensor::from_slice(&[1.0f32, f32::NAN]);
        assert!(LearnedEmbedding::new("<a>", &nan).is_err());
        assert!(LearnedEmbedding::new("two words", &vector()).is_err());
        assert!(LearnedEmbedding::new("", &vector()).is_err());

        // On read, a layout violation is corrupt data.
        let half = vector().to_kind(Kind::Half);
        let bytes = tensor_file::encode(&[("<a>".into(), &half)], HashMap::new()).unwrap();
        let err = LearnedEmbedding::from_learned_embeds(&bytes).unwrap_err();
        assert!(matches!(err, Error::CorruptArtifact { .. }), "{err}");
        let v = vector();
        let bytes =
            tensor_file::encode(&[("<a>".into(), &v), ("<b>".into(), &v)], HashMap::new()).unwrap();
        let err = LearnedEmbedding::from_learned_embeds(&bytes).unwrap_err();
        assert!(err.to_string().contains("exactly one tensor"), "{err}");
        let bytes = tensor_file::encode(&[("other".into(), &v)], HashMap::new()).unwrap();
        assert!(LearnedEmbedding::from_a1111("<a>", &bytes).is_err());
    }
}
