//! Personalized generation against diffusers (`tests/reference/personalized_reference.py`):
//! a concept written to a `file://` store as the trainer writes one, read back and
//! activated on the tiny model, rendered by [`render`], must give the final latents and
//! the decoded image that `StableDiffusionPipeline` gives with the stored embedding
//! loaded by `load_textual_inversion` and the stored U-Net delta added to the U-Net's
//! weights, both read by the reference from the store files alone, from the same
//! initial noise (the seeds' [`seeded_noise`]); within 1e-3 of the reference's largest
//! magnitude, in fp32, for DPM-Solver++ (2M), DDIM and Euler at guidance 7.5 with a
//! negative prompt, 10 steps at 64×64 pixels.
//!
//! Also:
//! - a low-rank delta (`<name>.lora_up`/`.lora_down`) on one sampler;
//! - test-time optimization: the sampler's per-prompt embedding, losses and images
//!   against the reference's AdamW replay of the same batches
//!   ([`TestTimeOptimizer::draw_batches`], which `run_seeded` uses) on the fine-tuned
//!   U-Net, followed by the pipeline with the adapted vector;
//! - that the delta, the learned vector and test-time optimization each change the
//!   result (so a silently skipped one fails the comparisons), and that a request
//!   without test-time optimization renders bit for bit the same before and after one
//!   with it.

use std::ops::ControlFlow;
use std::path::Path;

use coreg::artifact::{read_concept, LoadedConcept};
use coreg::base_model::BaseModel;
use coreg::generate::{seeded_noise, GenerationParams};
use coreg::method::regularization::RegularizationWeights;
use coreg::method::tto::{TestTimeOptimizer, TtoConfig, TtoModels, TtoStepLosses};
use coreg::optim::AdamWConfig;
use coreg::schedule::SamplerKind;
use coreg::store::Store;
use coreg_sampler::personalized::{render, ActiveConcept, ImageRequest, Rendered, RenderedImage};
use coreg_test_support::concept::{self, FakeConcept};
use coreg_test_support::reference::{assert_close, read, relative_max_error, run_reference};
use serde_json::json;
use tch::{Device, Tensor};

const TOLERANCE: f64 = 1e-3;
const STEPS: usize = 10;
const PIXELS: u32 = 64;
const IMAGES_PER_PROMPT: usize = 2;
const CATEGORY: &str = "dog";
const NEGATIVE: &str = "blurry, low quality";
const PROMPTS: [&str; 2] = ["a photo of a {}", "a {} wearing a red hat"];
const TTO_PROMPT: &str = "a {} sleeping in the snow";
/// The random model's cross-attention is nearly uniform, so L_attn is about 1e-6 and
/// the default λ_attn (0.05) would leave it no say in the update; this weight makes it
/// the larger term, so that the fine-tuned U-Net (which only L_attn sees) matters.
const TTO_LAMBDA_ATTN: f64 = 1e3;

fn params(sampler: SamplerKind) -> GenerationParams {
    GenerationParams {
        steps: STEPS,
        guidance_scale: 7.5,
        height: PIXELS,
        width: PIXELS,
        sampler,
    }
}

fn tto_config() -> TtoConfig {
    TtoConfig {
        steps: 3,
        batch_size: 2,
        optimizer: AdamWConfig::with_lr(2e-2),
        weights: RegularizationWeights {
            attention: TTO_LAMBDA_ATTN,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Writes concept `name` (token `<name>`, category "dog") to `store` and reads it back
/// (which verifies every blob): the word "dog"'s vector moved well away from it, and
/// every U-Net weight nudged, stored exactly or, with `rank`, as low-rank factors.
fn make_concept(
    model: &BaseModel,
    store: &Store,
    name: &str,
    seed: i64,
    rank: Option<i64>,
) -> LoadedConcept {
    let artifacts = FakeConcept {
        category: CATEGORY.into(),
        ..FakeConcept::new(&format!("<{name}>"), seed)
    }
    .trained(model, rank);
    assert_eq!(
        artifacts.unet_delta.len(),
        model.base_unet().len(),
        "every weight must be nudged"
    );
    concept::write(store, name, "v1", artifacts);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(read_concept(store, name, "v1"))
        .unwrap()
}

/// One request rendered by the sampler, and the reference cases (one per prompt)
/// that must match it.
struct Case {
    name: &'static str,
    concept: &'static str,
    request: ImageRequest,
}

impl Case {
    fn new(
        name: &'static str,
        concept: &'static str,
        sampler: SamplerKind,
        prompts: &[&str],
        first_seed: u64,
        tto: Option<TtoConfig>,
    ) -> Case {
        let count = (prompts.len() * IMAGES_PER_PROMPT) as u64;
        Case {
            name,
            concept,
            request: ImageRequest {
                prompts: prompts.iter().map(|p| p.to_string()).collect(),
                negative_prompt: NEGATIVE.into(),
                images_per_prompt: IMAGES_PER_PROMPT,
                seeds: (first_seed..first_seed + count).collect(),
                params: params(sampler),
                tto,
            },
        }
    }

    /// The reference case of prompt `i`.
    fn key(&self, i: usize) -> String {
        format!("{}.p{i}", self.name)
    }

    fn seeds(&self, i: usize) -> &[u64] {
        &self.request.seeds[i * IMAGES_PER_PROMPT..(i + 1) * IMAGES_PER_PROMPT]
    }
}

/// `request` rendered to the end.
fn rendered(
    model: &BaseModel,
    concept: Option<&ActiveConcept>,
    request: &ImageRequest,
) -> Completed {
    match render(model, concept, request, |_| ControlFlow::Continue(())).unwrap() {
        Rendered::Completed { images, tto_losses } => Completed { images, tto_losses },
        Rendered::Cancelled { .. } => panic!("nothing cancelled the request"),
    }
}

/// A completed render's images (prompt-major) and test-time losses.
struct Completed {
    images: Vec<RenderedImage>,
    tto_losses: Vec<Vec<TtoStepLosses>>,
}

impl Completed {
    /// Prompt `i`'s final latents [B, C, h, w].
    fn latents(&self, i: usize) -> Tensor {
        let of_prompt: Vec<Tensor> = self.images
            [i * IMAGES_PER_PROMPT..(i + 1) * IMAGES_PER_PROMPT]
            .iter()
            .map(|image| image.latents.shallow_clone())
            .collect();
        Tensor::stack(&of_prompt, 0)
    }

    /// Prompt `i`'s images [B, 3, H, W] as the pipeline's `pt` output, in [0, 1].
    fn images(&self, i: usize) -> Tensor {
        let of_prompt: Vec<Tensor> = self.images
            [i * IMAGES_PER_PROMPT..(i + 1) * IMAGES_PER_PROMPT]
            .iter()
            .map(|image| &image.image / 2.0 + 0.5)
            .collect();
        Tensor::stack(&of_prompt, 0)
    }

    fn all_latents(&self) -> Tensor {
        let all: Vec<Tensor> = self
            .images
            .iter()
            .map(|i| i.latents.shallow_clone())
            .collect();
        Tensor::stack(&all, 0)
    }
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn personalized_generation_matches_diffusers_with_the_concept_loaded() {
    // The tiny model's operations are too small to gain from threads, and spinning
    // threads only slow a loaded machine down.
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    run_reference(
        "model_reference",
        &[
            "make-model",
            "--config",
            "tiny",
            "--seed",
            "6",
            "--out",
            arg(root),
        ],
    );
    let model_dir = root.join("model");
    let store_dir = root.join("store");
    let store = Store::open(
        &format!("file://{}", store_dir.display()),
        Vec::<(String, String)>::new(),
    )
    .unwrap();
    let mut model = BaseModel::load(&model_dir, Device::Cpu, None).unwrap();
    let exact = make_concept(&model, &store, "toy", 1, None);
    let low_rank = make_concept(&model, &store, "toy-lr", 2, Some(4));

    let mut cases: Vec<Case> = SamplerKind::ALL
        .into_iter()
        .enumerate()
        .map(|(i, sampler)| {
            let name = match sampler {
                SamplerKind::DpmSolverPlusPlus => "dpm",
                SamplerKind::Ddim => "ddim",
                SamplerKind::EulerDiscrete => "euler",
            };
            Case::new(name, "toy", sampler, &PROMPTS, 100 * i as u64, None)
        })
        .collect();
    cases.push(Case::new(
        "low_rank",
        "toy-lr",
        SamplerKind::DpmSolverPlusPlus,
        &["a {} in the snow"],
        300,
        None,
    ));
    let tto_case = Case::new(
        "tto",
        "toy",
        SamplerKind::EulerDiscrete,
        &[TTO_PROMPT],
        400,
        Some(tto_config()),
    );
    cases.push(tto_case);

    // The reference's inputs: each prompt's initial noise, and the test-time batches
    // the sampler draws from the prompt's first seed.
    let token = |concept: &str| format!("<{concept}>");
    let mut inputs: Vec<(String, Tensor)> = Vec::new();
    let mut specs = Vec::new();
    for case in &cases {
        let params = &case.request.params;
        for (i, prompt) in case.request.prompts.iter().enumerate() {
            let key = case.key(i);
            let noise_key = format!("noise.{key}");
            inputs.push((noise_key.clone(), seeded_noise(case.seeds(i), 4, params)));
            let resolved = prompt.replace("{}", &token(case.concept));
            let tto = case.request.tto.map(|config| {
                let o = config.optimizer;
                json!({
                    "template": resolved,
                    "batches": format!("tto.{key}"),
                    "lr": o.lr, "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps,
                    "weight_decay": o.weight_decay,
                    "lambda_emb": config.weights.embedding,
                    "lambda_attn": config.weights.attention,
                    "variant": serde_json::to_value(config.variant).unwrap(),
                })
            });
            specs.push(json!({
                "name": key,
                "concept": case.concept,
                "version": "v1",
                "sampler": params.sampler.name(),
                "prompts": vec![resolved.as_str(); IMAGES_PER_PROMPT],
                "negative_prompt": NEGATIVE,
                "steps": params.steps,
                "guidance_scale": params.guidance_scale,
                "height": params.height,
                "width": params.width,
                "noise": noise_key,
                "tto": tto,
            }));
        }
    }
    let tto_case = cases.last().unwrap();
    let tto_prompt = TTO_PROMPT.replace("{}", &token("toy"));
    let mut tto_tokenizer = model.tokenizer.clone();
    tto_tokenizer.add_placeholder(&token("toy")).unwrap();
    // The test-time optimization the sampler runs: on the fine-tuned U-Net.
    model.use_unet_delta(&exact.unet_delta).unwrap();
    let direct_tto = {
        let optimizer = TestTimeOptimizer::new(
            tto_config(),
            TtoModels {
                text_encoder: &model.text_encoder,
                unet: &model.unet,
                schedule: &model.schedule,
            },
            &tto_tokenizer,
            &tto_prompt,
            &token("toy"),
            CATEGORY,
        )
        .unwrap();
        let latents = &exact.training_latents;
        let seed = tto_case.seeds(0)[0];
        let batches = optimizer.draw_batches(&latents.size(), seed).unwrap();
        assert_eq!(batches.len(), 3);
        for (i, b) in batches.iter().enumerate() {
            let indices: Vec<i64> = b.latent_indices.iter().map(|&i| i as i64).collect();
            let prefix = format!("tto.{}.step.{i}", tto_case.key(0));
            inputs.push((
                format!("{prefix}.latent_indices"),
                Tensor::from_slice(&indices),
            ));
            inputs.push((format!("{prefix}.noise"), b.noise.shallow_clone()));
            inputs.push((format!("{prefix}.timesteps"), b.timesteps.shallow_clone()));
        }
        optimizer
            .run_seeded(&exact.embedding.vector(), latents, seed)
            .unwrap()
    };
    let inputs_path = root.join("inputs.safetensors");
    Tensor::write_safetensors(&inputs, &inputs_path).unwrap();
    let cases_path = root.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_string_pretty(&specs).unwrap()).unwrap();
    let out_path = root.join("expected.safetensors");
    run_reference(
        "personalized_reference",
        &[
            "--model",
            arg(&model_dir),
            "--store",
            arg(&store_dir),
            "--cases",
            arg(&cases_path),
            "--inputs",
            arg(&inputs_path),
            "--out",
            arg(&out_path),
        ],
    );
    let expected = read(&out_path);

    let mut results = Vec::new();
    for case in &cases {
        let concept = if case.concept == "toy" {
            &exact
        } else {
            &low_rank
        };
        let active = ActiveConcept::activate(&mut model, concept).unwrap();
        let got = rendered(&model, Some(&active), &case.request);
        for i in 0..case.request.prompts.len() {
            let key = case.key(i);
            let want = |what: &str| &expected[&format!("{key}.{what}")];
            eprintln!(
                "{key}: relative error latents {:.2e}, image {:.2e}",
                relative_max_error(&got.latents(i), want("latents")),
                relative_max_error(&got.images(i), want("images")),
            );
            assert_close(
                &format!("{key} latents"),
                &got.latents(i),
                want("latents"),
                TOLERANCE,
            );
            assert_close(
                &format!("{key} image"),
                &got.images(i),
                want("images"),
                TOLERANCE,
            );
        }
        results.push(got);
    }

    // Test-time optimization: the render ran exactly the direct run (same batches,
    // same losses), whose vector and losses match the reference's.
    let tto_got = results.last().unwrap();
    let direct_rows: Vec<f64> = direct_tto
        .losses
        .iter()
        .flat_map(|l| [l.embedding, l.attention, l.total])
        .collect();
    assert_eq!(tto_got.tto_losses, vec![direct_tto.losses.clone()]);
    let want_losses = &expected[&format!("{}.tto_losses", tto_case.key(0))];
    let got_losses = Tensor::from_slice(&direct_rows).view([-1, 3]);
    for (column, what) in ["L_emb", "L_attn", "total"].into_iter().enumerate() {
        let column = column as i64;
        let err = relative_max_error(
            &got_losses.select(1, column),
            &want_losses.select(1, column),
        );
        eprintln!("tto: relative error {what} {err:.2e}");
        assert!(
            err <= TOLERANCE,
            "tto {what}: {err:.3e} exceeds {TOLERANCE:.0e}"
        );
    }
    let want_embedding = &expected[&format!("{}.tto_embedding", tto_case.key(0))];
    let stored = exact.embedding.vector();
    let embedding_err = relative_max_error(&direct_tto.embedding, want_embedding);
    let update_err = relative_max_error(
        &(&direct_tto.embedding - &stored),
        &(want_embedding - &stored),
    );
    eprintln!("tto: relative error embedding {embedding_err:.2e}, update {update_err:.2e}");
    assert!(
        embedding_err <= TOLERANCE,
        "tto embedding: {embedding_err:.3e}"
    );
    assert!(update_err <= TOLERANCE, "tto update: {update_err:.3e}");

    // Each part of the concept changes the result, so none can be skipped unnoticed.
    let active = ActiveConcept::activate(&mut model, &exact).unwrap();
    let dpm = &results[0];
    let mut plain_request = cases[0].request.clone();
    plain_request.prompts = PROMPTS.iter().map(|p| p.replace("{}", CATEGORY)).collect();
    let category_word = rendered(&model, None, &plain_request);
    let vector_effect = relative_max_error(&category_word.all_latents(), &dpm.all_latents());
    model.restore_unet().unwrap();
    let base_unet = rendered(&model, Some(&active), &cases[0].request);
    let delta_effect = relative_max_error(&base_unet.all_latents(), &dpm.all_latents());
    let base_model = rendered(&model, None, &plain_request);
    let concept_effect = relative_max_error(&base_model.all_latents(), &dpm.all_latents());
    let active = ActiveConcept::activate(&mut model, &exact).unwrap();
    let mut untuned = tto_case.request.clone();
    untuned.tto = None;
    let before = rendered(&model, Some(&active), &untuned);
    let tuned = rendered(&model, Some(&active), &tto_case.request);
    let after = rendered(&model, Some(&active), &untuned);
    let tto_effect = relative_max_error(&before.all_latents(), &tuned.all_latents());
    eprintln!(
        "relative change from the learned vector {vector_effect:.2e}, the U-Net delta \
         {delta_effect:.2e}, the whole concept {concept_effect:.2e}, test-time \
         optimization {tto_effect:.2e}"
    );
    assert!(vector_effect > 1e-2, "{vector_effect}");
    assert!(delta_effect > 1e-2, "{delta_effect}");
    assert!(concept_effect > 1e-2, "{concept_effect}");
    assert!(tto_effect > 1e-3, "{tto_effect}");
    assert!(tuned.all_latents().equal(&tto_got.all_latents()));
    for (a, b) in before.images.iter().zip(&after.images) {
        assert_eq!(
            a.png, b.png,
            "image {} changed after test-time optimization",
            a.index
        );
        assert!(a.latents.equal(&b.latents));
    }
}
