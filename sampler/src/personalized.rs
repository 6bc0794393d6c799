//! Personalized generation: a concept's learned token S* and U-Net delta on the base
//! model, and for each prompt, optionally, CoRe's test-time optimization of S* first
//! (docs/method.md, "Test-time optimization"). The one-shot `generate` command runs it
//! now; the gRPC service will run the same on its model thread.

use std::ops::ControlFlow;

use coreg::artifact::LoadedConcept;
use coreg::base_model::BaseModel;
use coreg::generate::{seeded_noise, Generation, GenerationParams, Pipeline};
use coreg::images::tensor_to_png;
use coreg::method::prompts::SLOT;
use coreg::method::tto::{TestTimeOptimizer, TtoConfig, TtoModels, TtoStepLosses};
use coreg::model::tokenizer::ClipTokenizer;
use coreg::{Error, Result};
use tch::Tensor;

/// The most prompts and images one request may ask for.
pub const MAX_PROMPTS: usize = 16;
pub const MAX_IMAGES_PER_PROMPT: usize = 8;

/// A concept in use: its delta is in the model's U-Net and its token is known to a
/// copy of the base tokenizer. The stored concept is only read, never changed.
pub struct ActiveConcept {
    pub name: String,
    pub version: String,
    /// The placeholder prompts name the concept by, e.g. `<toy>`.
    pub token: String,
    /// The super-category word test-time optimization compares the context against.
    pub category: String,
    tokenizer: ClipTokenizer,
    token_id: i64,
    /// S* `[D]`, fp32 on the CPU.
    embedding: Tensor,
    /// The training photos' latents [N, C, h, w], which test-time optimization noises.
    training_latents: Tensor,
}

impl ActiveConcept {
    /// Applies `concept`'s U-Net delta to `model` (from the untouched base weights, so
    /// the previous concept leaves nothing behind) and adds its token.
    pub fn activate(model: &mut BaseModel, concept: &LoadedConcept) -> Result<ActiveConcept> {
        let embedding = concept.embedding.vector();
        let hidden = model.text_encoder.model.hidden_size();
        if embedding.size() != [hidden] {
            return Err(Error::InvalidInput(format!(
                "concept {}/{}: its embedding has {} dimensions, the text encoder {hidden}",
                concept.manifest.concept,
                concept.manifest.version,
                concept.embedding.dim()
            )));
        }
        let token = concept.embedding.token().to_string();
        let mut tokenizer = model.tokenizer.clone();
        let token_id = tokenizer.add_placeholder(&token)?;
        model.use_unet_delta(&concept.unet_delta)?;
        Ok(ActiveConcept {
            name: concept.manifest.concept.clone(),
            version: concept.manifest.version.clone(),
            token,
            category: concept.manifest.super_category.clone(),
            tokenizer,
            token_id,
            embedding,
            training_latents: concept.training_latents.shallow_clone(),
        })
    }

    /// `prompt` with `{}` standing for the concept's token; the result must name the
    /// concept, or the concept would be loaded for nothing.
    pub fn resolve_prompt(&self, prompt: &str) -> Result<String> {
        let mut resolved =
            resolve_prompts(&self.tokenizer, Some(&self.token), &[prompt.to_owned()], "")?;
        Ok(resolved.remove(0))
    }

    /// The base tokenizer with this concept's token added.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }
}

/// `prompts` as the model will read them (with `{}` replaced by the concept's token,
/// each required to name the concept when there is one), checked against CLIP's
/// context length with `tokenizer` (which must know the token) together with the
/// negative prompt, so that a request is refused before any work is done for it.
pub fn resolve_prompts(
    tokenizer: &ClipTokenizer,
    concept_token: Option<&str>,
    prompts: &[String],
    negative_prompt: &str,
) -> Result<Vec<String>> {
    let fits = |text: &str, what: &str| -> Result<()> {
        let tokens = tokenizer.encode(text)?;
        if tokens.truncated {
            return Err(Error::InvalidInput(format!(
                "{what} {text:?} is {} CLIP tokens long (with start and end); the limit is {}",
                tokens.untruncated_len,
                tokens.ids.len()
            )));
        }
        Ok(())
    };
    fits(negative_prompt, "the negative prompt")?;
    prompts
        .iter()
        .map(|prompt| {
            let resolved = match concept_token {
                Some(token) => {
                    let resolved = prompt.replace(SLOT, token);
                    if !resolved.contains(token) {
                        return Err(Error::InvalidInput(format!(
                            "prompt {prompt:?} does not name the concept: write {token} or \
                             {SLOT} where it goes"
                        )));
                    }
                    resolved
                }
                None => prompt.clone(),
            };
            fits(&resolved, "prompt")?;
            Ok(resolved)
        })
        .collect()
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub prompts: Vec<String>,
    /// diffusers' default, the empty prompt, when not given.
    pub negative_prompt: String,
    pub images_per_prompt: usize,
    /// One seed per image, prompt-major: image `j` of prompt `i` uses
    /// `seeds[i * images_per_prompt + j]`.
    pub seeds: Vec<u64>,
    pub params: GenerationParams,
    /// Test-time optimization before each prompt; needs a concept.
    pub tto: Option<TtoConfig>,
}

impl ImageRequest {
    pub fn image_count(&self) -> usize {
        self.prompts.len() * self.images_per_prompt
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidInput(message));
        if self.prompts.is_empty() || self.prompts.len() > MAX_PROMPTS {
            return invalid(format!(
                "{} prompts; a request has 1 to {MAX_PROMPTS}",
                self.prompts.len()
            ));
        }
        if self.images_per_prompt == 0 || self.images_per_prompt > MAX_IMAGES_PER_PROMPT {
            return invalid(format!(
                "{} images per prompt; the range is 1 to {MAX_IMAGES_PER_PROMPT}",
                self.images_per_prompt
            ));
        }
        if self.seeds.len() != self.image_count() {
            return invalid(format!(
                "{} seeds for {} images",
                self.seeds.len(),
                self.image_count()
            ));
        }
        if let Some(tto) = &self.tto {
            tto.validate()?;
        }
        self.params.validate()
    }
}

/// One finished image.
#[derive(Debug)]
pub struct RenderedImage {
    /// Its place in the request, prompt-major.
    pub index: usize,
    /// The prompt as the model saw it (`{}` replaced by the token).
    pub prompt: String,
    pub seed: u64,
    /// Empty when the latents became non-finite (NaN/Inf): no image is made of them.
    pub png: Vec<u8>,
    /// The final latents [C, H/8, W/8], in the U-Net's scale (for parity checks).
    pub latents: Tensor,
    /// The decoded image [3, H, W] in [−1, 1], before 8-bit quantization.
    pub image: Tensor,
}

impl RenderedImage {
    /// False when the latents became NaN/Inf (a diverged sampler or broken weights).
    pub fn is_finite(&self) -> bool {
        !self.png.is_empty()
    }
}

/// How far a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Test-time optimization of prompt `prompt` finished.
    Optimized { prompt: usize },
    /// Denoising step `step` of `total` for prompt `prompt`'s images.
    Denoised {
        prompt: usize,
        step: usize,
        total: usize,
    },
}

/// How a request ended.
#[derive(Debug)]
pub enum Rendered {
    Completed {
        images: Vec<RenderedImage>,
        /// Per prompt, the test-time losses when it ran.
        tto_losses: Vec<Vec<TtoStepLosses>>,
    },
    /// `progress` asked to stop; the images of prompts already finished.
    Cancelled { images: Vec<RenderedImage> },
}

/// Generates `request` on `model`, with `concept` (whose delta must be the one in
/// `model`'s U-Net: see [`ActiveConcept::activate`]) or on the base model alone.
/// Prompts are generated one after the other, all images of a prompt in one batch.
pub fn render(
    model: &BaseModel,
    concept: Option<&ActiveConcept>,
    request: &ImageRequest,
    mut progress: impl FnMut(Progress) -> ControlFlow<()>,
) -> Result<Rendered> {
    request.validate()?;
    if request.tto.is_some() && concept.is_none() {
        return Err(Error::InvalidInput(
            "test-time optimization needs a concept".into(),
        ));
    }
    let prompts = resolve_prompts(
        concept.map_or(&model.tokenizer, |c| &c.tokenizer),
        concept.map(|c| c.token.as_str()),
        &request.prompts,
        &request.negative_prompt,
    )?;
    let pipeline = Pipeline {
        tokenizer: concept.map_or(&model.tokenizer, |c| &c.tokenizer),
        text_encoder: &model.text_encoder,
        unet: &model.unet,
        vae: &model.vae,
        scheduler: &model.folder.scheduler,
    };
    let channels = model.unet.model.in_channels();
    let per_prompt = request.images_per_prompt;
    let mut images = Vec::with_capacity(request.image_count());
    let mut tto_losses = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let seeds = &request.seeds[i * per_prompt..(i + 1) * per_prompt];
        let embedding = match (concept, &request.tto) {
            (Some(concept), Some(config)) => {
                let optimizer = TestTimeOptimizer::new(
                    *config,
                    TtoModels {
                        text_encoder: &model.text_encoder,
                        unet: &model.unet,
                        schedule: &model.schedule,
                    },
                    &concept.tokenizer,
                    prompt,
                    &concept.token,
                    &concept.category,
                )?;
                // The prompt's first seed also draws the test-time batches, so a
                // request is reproducible from its seeds alone.
                let result = optimizer.run_seeded(
                    &concept.embedding,
                    &concept.training_latents,
                    seeds[0],
                )?;
                tto_losses.push(result.losses);
                if progress(Progress::Optimized { prompt: i }).is_break() {
                    return Ok(Rendered::Cancelled { images });
                }
                Some(result.embedding)
            }
            (Some(concept), None) => Some(concept.embedding.shallow_clone()),
            (None, _) => None,
        };
        let placeholders: Vec<(i64, &Tensor)> = match (concept, &embedding) {
            (Some(concept), Some(embedding)) => vec![(concept.token_id, embedding)],
            _ => Vec::new(),
        };
        let batch: Vec<&str> = vec![prompt.as_str(); per_prompt];
        let conditioning =
            pipeline.encode_prompts(&batch, &request.negative_prompt, &placeholders)?;
        let noise = seeded_noise(seeds, channels, &request.params);
        let generation =
            pipeline.generate(&conditioning, &request.params, &noise, |step, total| {
                progress(Progress::Denoised {
                    prompt: i,
                    step,
                    total,
                })
            })?;
        let Generation::Completed(generated) = generation else {
            return Ok(Rendered::Cancelled { images });
        };
        for (j, &seed) in seeds.iter().enumerate() {
            let latents = generated.latents.get(j as i64);
            let finite = latents.isfinite().all().int64_value(&[]) != 0;
            let image = generated.images.get(j as i64);
            images.push(RenderedImage {
                index: i * per_prompt + j,
                prompt: prompt.clone(),
                seed,
                png: if finite {
                    tensor_to_png(&image)?
                } else {
                    Vec::new()
                },
                latents: generated.latents.get(j as i64).to_device(tch::Device::Cpu),
                image,
            });
        }
    }
    Ok(Rendered::Completed { images, tto_losses })
}

#[cfg(test)]
mod tests {
    use super::*;
    use coreg::artifact::unet_delta::{snapshot, Parameters};
    use coreg::artifact::{
        base_model_identity, read_concept, write_concept, ConceptArtifacts, LearnedEmbedding,
        LossHistory, UNetDelta,
    };
    use coreg::model::random::{write_random_model, ModelSize};
    use coreg::schedule::{PredictionType, SamplerKind};
    use coreg::store::Store;
    use tch::{Device, Kind};

    /// A concept `name` on `model`: the word "dog" nudged, every U-Net weight nudged.
    fn concept(model: &BaseModel, store: &Store, name: &str, seed: i64) -> LoadedConcept {
        tch::manual_seed(seed);
        let dog = model.tokenizer.single_token_id("dog").unwrap();
        let word = tch::no_grad(|| {
            model
                .text_encoder
                .model
                .token_embedding(&Tensor::from_slice(&[dog]))
                .get(0)
        });
        let base = model.base_unet();
        // In name order: a `HashMap`'s order would draw different noise per run.
        let mut names: Vec<&String> = base.keys().collect();
        names.sort();
        let tuned: Parameters = names
            .into_iter()
            .map(|k| (k.clone(), &base[k] + Tensor::randn_like(&base[k]) * 1e-2))
            .collect();
        let artifacts = ConceptArtifacts {
            embedding: LearnedEmbedding::new(
                &format!("<{name}>"),
                &(&word + Tensor::randn_like(&word) * 0.05),
            )
            .unwrap(),
            unet_delta: UNetDelta::exact(base, &tuned).unwrap(),
            training_latents: Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
            super_category: "dog".into(),
            base_model: base_model_identity(&model.folder).unwrap(),
            hyper_parameters: serde_json::json!({}),
            seed: 0,
            losses: LossHistory::default(),
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime
            .block_on(write_concept(store, name, "v1", artifacts))
            .unwrap();
        runtime.block_on(read_concept(store, name, "v1")).unwrap()
    }

    fn pngs(model: &BaseModel, concept: &ActiveConcept) -> Vec<Vec<u8>> {
        let request = ImageRequest {
            prompts: vec!["a photo of a {}".into()],
            negative_prompt: String::new(),
            images_per_prompt: 2,
            seeds: vec![5, 6],
            params: GenerationParams {
                steps: 3,
                height: 32,
                width: 32,
                sampler: SamplerKind::Ddim,
                ..GenerationParams::default()
            },
            tto: None,
        };
        match render(
            model,
            Some(concept),
            &request,
            |_| ControlFlow::Continue(()),
        )
        .unwrap()
        {
            Rendered::Completed { images, .. } => images.into_iter().map(|i| i.png).collect(),
            Rendered::Cancelled { .. } => panic!("nothing cancelled it"),
        }
    }

    /// Switching concepts back and forth rewrites the U-Net from the untouched base
    /// each time: A after B is A exactly, and the base comes back bit for bit.
    #[test]
    fn switching_concepts_a_b_a_gives_identical_images_and_no_drift() {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), ModelSize::Tiny, PredictionType::Epsilon, 0).unwrap();
        let mut model = BaseModel::load(dir.path(), Device::Cpu, None).unwrap();
        let store = Store::open("memory:///", Vec::<(String, String)>::new()).unwrap();
        let a = concept(&model, &store, "a", 1);
        let b = concept(&model, &store, "b", 2);

        let active = ActiveConcept::activate(&mut model, &a).unwrap();
        let first = pngs(&model, &active);
        let active = ActiveConcept::activate(&mut model, &b).unwrap();
        let other = pngs(&model, &active);
        for _ in 0..5 {
            ActiveConcept::activate(&mut model, &b).unwrap();
            ActiveConcept::activate(&mut model, &a).unwrap();
        }
        let active = ActiveConcept::activate(&mut model, &a).unwrap();
        let again = pngs(&model, &active);
        assert_eq!(first, again, "concept A must render the same after B");
        assert_ne!(first, other, "concepts A and B must differ");

        model.restore_unet().unwrap();
        let now = snapshot(&model.unet.vars, Device::Cpu).unwrap();
        for (name, base) in model.base_unet() {
            assert!(now[name].equal(base), "{name} drifted from the base");
        }
    }

    #[test]
    fn a_prompt_must_name_the_concept() {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), ModelSize::Tiny, PredictionType::Epsilon, 0).unwrap();
        let mut model = BaseModel::load(dir.path(), Device::Cpu, None).unwrap();
        let store = Store::open("memory:///", Vec::<(String, String)>::new()).unwrap();
        let a = concept(&model, &store, "a", 1);
        let active = ActiveConcept::activate(&mut model, &a).unwrap();
        assert_eq!(active.resolve_prompt("a {} here").unwrap(), "a <a> here");
        assert_eq!(active.resolve_prompt("a <a> here").unwrap(), "a <a> here");
        let error = active.resolve_prompt("a dog").unwrap_err().to_string();
        assert!(error.contains("does not name the concept"), "{error}");
    }
}
