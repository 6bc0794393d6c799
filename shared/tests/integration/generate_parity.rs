//! The denoising loop against diffusers' `StableDiffusionPipeline` on the tiny model.
//!
//! Both sides start from the same initial latents and run 10 steps at guidance 7.5 and
//! 64×64 pixels (8×8 latents) with each sampler, with prompts and a negative prompt;
//! one case splices a learned token's vector (diffusers loads it with
//! `load_textual_inversion`), one runs without guidance. The final latents, the decoded
//! images and the pipeline's post-processed images must agree within 1e-3 of the
//! reference's largest magnitude, in fp32 (`tests/reference/generate_reference.py`).

use std::ops::ControlFlow;
use std::path::Path;

use coreg::generate::{seeded_noise, Generation, GenerationParams, Pipeline, TextConditioning};
use coreg::model::{LoadOptions, ModelFolder};
use coreg::schedule::SamplerKind;
use serde_json::json;
use tch::{Kind, Tensor};

use coreg_test_support::reference::{assert_close, read, relative_max_error, run_reference};

const TOLERANCE: f64 = 1e-3;
const CONCEPT: &str = "<concept>";

struct Case {
    name: &'static str,
    sampler: SamplerKind,
    prompts: &'static [&'static str],
    negative_prompt: Option<&'static str>,
    guidance_scale: f64,
    learned_token: bool,
}

const PROMPTS: &[&str] = &[
    "a photo of a dog",
    "a watercolor painting of a cat in the snow",
];

fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = SamplerKind::ALL
        .into_iter()
        .map(|sampler| Case {
            name: match sampler {
                SamplerKind::DpmSolverPlusPlus => "dpm",
                SamplerKind::Ddim => "ddim",
                SamplerKind::EulerDiscrete => "euler",
            },
            sampler,
            prompts: PROMPTS,
            negative_prompt: Some("blurry, low quality"),
            guidance_scale: 7.5,
            learned_token: false,
        })
        .collect();
    cases.push(Case {
        name: "learned",
        sampler: SamplerKind::DpmSolverPlusPlus,
        prompts: &["a photo of a <concept>", "a <concept> wearing a red hat"],
        negative_prompt: None,
        guidance_scale: 7.5,
        learned_token: true,
    });
    cases.push(Case {
        name: "unguided",
        sampler: SamplerKind::EulerDiscrete,
        prompts: &["a photo of a dog"],
        negative_prompt: None,
        guidance_scale: 1.0,
        learned_token: false,
    });
    cases
}

fn params(case: &Case) -> GenerationParams {
    GenerationParams {
        steps: 10,
        guidance_scale: case.guidance_scale,
        height: 64,
        width: 64,
        sampler: case.sampler,
    }
}

fn noise_key(case: &Case) -> String {
    format!("noise.{}", case.name)
}

#[test]
fn denoising_matches_diffusers_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let root_str = root.to_str().unwrap();
    run_reference(
        "model_reference",
        &[
            "make-model",
            "--config",
            "tiny",
            "--seed",
            "5",
            "--out",
            root_str,
        ],
    );
    let model_dir = root.join("model");
    let folder = ModelFolder::open(&model_dir).unwrap();
    let options = LoadOptions::default();
    let text_encoder = folder.load_text_encoder(&options).unwrap();
    let unet = folder.load_unet(&options).unwrap();
    let vae = folder.load_vae(&options).unwrap();
    let mut tokenizer = folder.tokenizer().unwrap();
    let concept_id = tokenizer.add_placeholder(CONCEPT).unwrap();

    // A learned vector far from every word's, so that splicing it (or not) shows.
    tch::manual_seed(17);
    let hidden = text_encoder.model.hidden_size();
    let concept_vector = Tensor::randn([hidden], (Kind::Float, tch::Device::Cpu)) * 0.5;
    let embedding_path = root.join("learned_embeds.safetensors");
    Tensor::write_safetensors(&[(CONCEPT, concept_vector.unsqueeze(0))], &embedding_path).unwrap();

    let cases = cases();
    let mut noise = Vec::new();
    let mut specs = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let seeds: Vec<u64> = (0..case.prompts.len() as u64)
            .map(|j| 100 * i as u64 + j)
            .collect();
        noise.push((noise_key(case), seeded_noise(&seeds, 4, &params(case))));
        specs.push(json!({
            "name": case.name,
            "sampler": case.sampler.name(),
            "prompts": case.prompts,
            "negative_prompt": case.negative_prompt,
            "steps": 10,
            "guidance_scale": case.guidance_scale,
            "height": 64,
            "width": 64,
            "noise": noise_key(case),
            "embedding": case.learned_token.then(|| embedding_path.to_str().unwrap()),
        }));
    }
    let inputs_path = root.join("inputs.safetensors");
    Tensor::write_safetensors(&noise, &inputs_path).unwrap();
    let cases_path = root.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_string_pretty(&specs).unwrap()).unwrap();
    let out_path = root.join("expected.safetensors");
    run_reference(
        "generate_reference",
        &[
            "--model",
            model_dir.to_str().unwrap(),
            "--cases",
            cases_path.to_str().unwrap(),
            "--inputs",
            inputs_path.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    let expected = read(&out_path);

    let pipeline = Pipeline {
        tokenizer: &tokenizer,
        text_encoder: &text_encoder,
        unet: &unet,
        vae: &vae,
        scheduler: &folder.scheduler,
    };
    let mut learned_latents = None;
    let mut plain_latents = None;
    for (case, (_, initial)) in cases.iter().zip(&noise) {
        let placeholders = [(concept_id, &concept_vector)];
        let conditioning: TextConditioning = pipeline
            .encode_prompts(
                case.prompts,
                case.negative_prompt.unwrap_or(""),
                if case.learned_token {
                    &placeholders[..]
                } else {
                    &[]
                },
            )
            .unwrap();
        let mut reported = Vec::new();
        let generation = pipeline
            .generate(&conditioning, &params(case), initial, |done, total| {
                reported.push((done, total));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(reported, (1..=10).map(|i| (i, 10)).collect::<Vec<_>>());
        let Generation::Completed(generated) = generation else {
            panic!("{}: not completed", case.name);
        };
        let want = |what: &str| &expected[&format!("{}.{what}", case.name)];
        let decoded = coreg::generate::decode_latents(&vae, &generated.latents);
        eprintln!(
            "{}: relative error latents {:.2e}, decoded {:.2e}, images {:.2e}",
            case.name,
            relative_max_error(&generated.latents, want("latents")),
            relative_max_error(&decoded, want("decoded")),
            relative_max_error(&(&generated.images / 2.0 + 0.5), want("images")),
        );
        assert_close(
            &format!("{} latents", case.name),
            &generated.latents,
            want("latents"),
            TOLERANCE,
        );
        assert_close(
            &format!("{} decoded", case.name),
            &decoded,
            want("decoded"),
            TOLERANCE,
        );
        // The pipeline's "pt" output is (x/2 + 0.5).clamp(0, 1) of the decode.
        assert_close(
            &format!("{} images", case.name),
            &(&generated.images / 2.0 + 0.5),
            want("images"),
            TOLERANCE,
        );
        if case.name == "learned" {
            learned_latents = Some(generated.latents);
        } else if case.name == "dpm" {
            plain_latents = Some(generated.latents);
        }
    }
    // Guidance and the learned vector both change the result: the comparisons above
    // would not notice a branch that was silently skipped otherwise.
    let (learned, plain) = (learned_latents.unwrap(), plain_latents.unwrap());
    assert!(relative_max_error(&learned, &plain) > 1e-2);
}

#[test]
fn cancelling_stops_between_steps() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    coreg_test_support::model::write_tiny(root, 3);
    check_cancel(root);
}

fn check_cancel(root: &Path) {
    let folder = ModelFolder::open(root).unwrap();
    let options = LoadOptions::default();
    let text_encoder = folder.load_text_encoder(&options).unwrap();
    let unet = folder.load_unet(&options).unwrap();
    let vae = folder.load_vae(&options).unwrap();
    let tokenizer = folder.tokenizer().unwrap();
    let pipeline = Pipeline {
        tokenizer: &tokenizer,
        text_encoder: &text_encoder,
        unet: &unet,
        vae: &vae,
        scheduler: &folder.scheduler,
    };
    let params = GenerationParams {
        steps: 5,
        height: 64,
        width: 64,
        ..Default::default()
    };
    let conditioning = pipeline.encode_prompts(&["a dog"], "", &[]).unwrap();
    let noise = seeded_noise(&[1], 4, &params);
    let mut calls = 0;
    let outcome = pipeline
        .generate(&conditioning, &params, &noise, |done, _| {
            calls += 1;
            if done == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert!(matches!(
        outcome,
        Generation::Cancelled { completed_steps: 2 }
    ));
    assert_eq!(calls, 2);

    // Inputs that cannot work are refused before the first step.
    let wrong_noise = seeded_noise(&[1, 2], 4, &params);
    assert!(pipeline
        .generate(&conditioning, &params, &wrong_noise, |_, _| {
            ControlFlow::Continue(())
        })
        .is_err());
    let unconditioned = TextConditioning {
        prompt: conditioning.prompt.shallow_clone(),
        negative: None,
    };
    let message = pipeline
        .generate(&unconditioned, &params, &noise, |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string();
    assert!(message.contains("negative prompt"), "{message}");
    let long = ["a very long prompt"; 30].join(" and ");
    let message = pipeline
        .encode_prompts(&[long.as_str()], "", &[])
        .unwrap_err()
        .to_string();
    assert!(message.contains("the limit is 77"), "{message}");
}
