//! CoRe's training loops against the Python reference (`tests/reference/
//! replay_reference.py`, on diffusers/transformers and `torch.optim.AdamW`), both
//! consuming the same recorded images, noise, timesteps and template choices.
//!
//! On the tiny random model:
//! - 20 stage-1 steps (with a rescaling window inside them) then 5 stage-2 steps must
//!   end with the same S* (max |rust − ref| / max |ref| within 1e-3, the measure of
//!   `coreg_test_support::reference::relative_max_error`), the same loss histories
//!   (that measure per loss) and the same U-Net delta tuned − base (relative L2 error
//!   of the whole delta within 1e-3; the comment at that check says why not max-abs);
//! - test-time optimization with given batches must end with the same per-prompt
//!   embedding (max-abs measure within 1e-4) and leave the concept's vector alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use coreg::dataset::{Stage1Batch, Stage2Batch, TtoBatch};
use coreg::method::prompts::PromptSet;
use coreg::method::regularization::RegularizationWeights;
use coreg::method::rescale::RescaleWindow;
use coreg::method::stage1::{FrozenModels, Stage1, Stage1Config};
use coreg::method::stage2::{Stage2, Stage2Config, Stage2Models};
use coreg::method::tto::{TestTimeOptimizer, TtoConfig, TtoModels};
use coreg::model::clip::ClipTextTransformer;
use coreg::model::tokenizer::ClipTokenizer;
use coreg::model::unet::UNet2DConditionModel;
use coreg::model::vae::AutoencoderKl;
use coreg::model::{Component, LoadOptions, ModelFolder};
use coreg::optim::AdamWConfig;
use coreg::schedule::NoiseSchedule;
use coreg_test_support::reference::{read, relative_max_error, run_reference};
use tch::{Device, Kind, Tensor};

const PLACEHOLDER: &str = "<concept>";
const CATEGORY: &str = "dog";
const STAGE1_STEPS: usize = 20;
const STAGE2_STEPS: usize = 5;
const BATCH: i64 = 2;
/// 64 px images: 8×8 latents, the tiny U-Net's sample size.
const PIXELS: i64 = 64;
/// Inside the 20 steps, so that recording and rescaling both happen.
const RESCALE: RescaleWindow = RescaleWindow {
    record_at: 5,
    until: 12,
};
const STAGE1_LR: f64 = 5e-3;
/// Large enough that five steps move the weights far beyond float rounding.
const STAGE2_LR: f64 = 1e-4;
/// Test-time optimization's prompt, with the concept mid-prompt.
const TTO_PROMPT: &str = "a <concept> sleeping in the snow";
/// The random model's attention is nearly uniform, so L_attn is about 1e-6 and with
/// the default λ_attn (0.05) it would not steer the update at all; this weight makes
/// it the larger term, so the comparison covers the attention path too.
const TTO_LAMBDA_ATTN: f64 = 1e3;

/// The tiny model as diffusers built it, loaded here.
struct Case {
    dir: tempfile::TempDir,
    folder: ModelFolder,
    tokenizer: ClipTokenizer,
    text_encoder: Component<ClipTextTransformer>,
    unet: Component<UNet2DConditionModel>,
    vae: Component<AutoencoderKl>,
    schedule: NoiseSchedule,
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        run_reference(
            "model_reference",
            &[
                "make-model",
                "--config",
                "tiny",
                "--seed",
                "4",
                "--out",
                dir.path().to_str().unwrap(),
            ],
        );
        let folder = ModelFolder::open(dir.path().join("model")).unwrap();
        let mut tokenizer = folder.tokenizer().unwrap();
        assert_eq!(tokenizer.add_placeholder(PLACEHOLDER).unwrap(), 49408);
        let opts = LoadOptions::default();
        Case {
            tokenizer,
            text_encoder: folder.load_text_encoder(&opts).unwrap(),
            unet: folder.load_unet(&opts).unwrap(),
            vae: folder.load_vae(&opts).unwrap(),
            schedule: NoiseSchedule::new(&folder.scheduler).unwrap(),
            folder,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn category_vector(&self) -> Tensor {
        self.text_encoder
            .model
            .token_embedding(&Tensor::from(1929i64))
            .detach()
    }
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn latent_shape() -> [i64; 4] {
    [BATCH, 4, PIXELS / 8, PIXELS / 8]
}

fn pixels() -> Tensor {
    Tensor::rand([BATCH, 3, PIXELS, PIXELS], (Kind::Float, Device::Cpu)) * 2.0 - 1.0
}

fn timesteps() -> Tensor {
    Tensor::randint(1000, [BATCH], (Kind::Int64, Device::Cpu))
}

fn write(path: &Path, tensors: Vec<(String, Tensor)>) {
    Tensor::write_safetensors(&tensors, path).unwrap();
}

fn assert_within(name: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    let err = relative_max_error(got, want);
    assert!(
        err <= tol,
        "{name}: max |rust − ref| / max |ref| = {err:.3e} exceeds {tol:.0e}"
    );
    err
}

/// Rows of one loss history as a [steps, columns] tensor.
fn history(rows: &[Vec<f64>]) -> Tensor {
    let columns = rows[0].len() as i64;
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    Tensor::from_slice(&flat).view([-1, columns])
}

/// Each column of a loss history against the reference's.
fn assert_history(what: &str, columns: &[&str], got: &[Vec<f64>], want: &Tensor) {
    let got = history(got);
    assert_eq!(got.size(), want.size(), "{what} history shape");
    for (c, name) in columns.iter().enumerate() {
        let c = c as i64;
        assert_within(
            &format!("{what} {name} history"),
            &got.select(1, c),
            &want.select(1, c),
            1e-3,
        );
    }
}

/// The norm stays at the recorded one through the window and moves outside it.
fn assert_rescaled(who: &str, norms: &[f64]) {
    let recorded = norms[RESCALE.record_at - 1];
    for (i, norm) in norms.iter().enumerate() {
        let step = i + 1;
        let held = (norm - recorded).abs() <= 1e-6 * recorded;
        if RESCALE.holds(step) {
            assert!(
                held,
                "{who}: step {step} norm {norm} vs recorded {recorded}"
            );
        } else if step > RESCALE.until {
            assert!(!held, "{who}: step {step} still at the recorded norm");
        }
    }
}

/// The recorded draws of both stages, in the replay file's layout.
struct Replay {
    stage1: Vec<Stage1Batch>,
    stage2: Vec<Stage2Batch>,
}

impl Replay {
    fn draw(templates: usize) -> Self {
        tch::manual_seed(20240829);
        let stage1 = (0..STAGE1_STEPS)
            .map(|_| Stage1Batch {
                pixels: pixels(),
                posterior_noise: randn(&latent_shape()),
                noise: randn(&latent_shape()),
                timesteps: timesteps(),
                template_index: Tensor::randint(templates as i64, [1], (Kind::Int64, Device::Cpu))
                    .int64_value(&[0]) as usize,
            })
            .collect();
        let stage2 = (0..STAGE2_STEPS)
            .map(|_| Stage2Batch {
                pixels: pixels(),
                posterior_noise: randn(&latent_shape()),
                noise: randn(&latent_shape()),
                timesteps: timesteps(),
            })
            .collect();
        Replay { stage1, stage2 }
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (i, b) in self.stage1.iter().enumerate() {
            let index = Tensor::from_slice(&[b.template_index as i64]);
            for (name, t) in [
                ("pixels", &b.pixels),
                ("posterior_noise", &b.posterior_noise),
                ("noise", &b.noise),
                ("timesteps", &b.timesteps),
                ("template_index", &index),
            ] {
                tensors.push((format!("stage1.{i}.{name}"), t.shallow_clone()));
            }
        }
        for (i, b) in self.stage2.iter().enumerate() {
            for (name, t) in [
                ("pixels", &b.pixels),
                ("posterior_noise", &b.posterior_noise),
                ("noise", &b.noise),
                ("timesteps", &b.timesteps),
            ] {
                tensors.push((format!("stage2.{i}.{name}"), t.shallow_clone()));
            }
        }
        tensors
    }
}

/// Test-time optimization's given inputs.
struct TtoInputs {
    concept: Tensor,
    latents: Tensor,
    batches: Vec<TtoBatch>,
}

impl TtoInputs {
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = vec![
            ("embedding".to_string(), self.concept.shallow_clone()),
            ("latents".to_string(), self.latents.shallow_clone()),
        ];
        for (i, b) in self.batches.iter().enumerate() {
            let indices: Vec<i64> = b.latent_indices.iter().map(|&i| i as i64).collect();
            tensors.push((
                format!("step.{i}.latent_indices"),
                Tensor::from_slice(&indices),
            ));
            tensors.push((format!("step.{i}.noise"), b.noise.shallow_clone()));
            tensors.push((format!("step.{i}.timesteps"), b.timesteps.shallow_clone()));
        }
        tensors
    }
}

/// One model and one reference run (each costs a Python start-up) for both checks.
#[test]
fn training_and_test_time_optimization_replay_like_the_python_reference() {
    // The tiny model's operations are too small to gain from threads, and spinning
    // threads only slow a loaded CI machine down.
    tch::set_num_threads(1);
    let mut case = Case::new();
    let prompt_set = PromptSet::animate();
    let prompts = case.path("prompts.txt");
    std::fs::write(&prompts, prompt_set.templates().join("\n")).unwrap();
    let replay = Replay::draw(prompt_set.len());
    let replay_path = case.path("replay.safetensors");
    write(&replay_path, replay.tensors());

    let tto_config = TtoConfig {
        batch_size: BATCH as usize,
        weights: RegularizationWeights {
            attention: TTO_LAMBDA_ATTN,
            ..Default::default()
        },
        ..Default::default()
    };
    let tto_models = TtoModels {
        text_encoder: &case.text_encoder,
        unet: &case.unet,
        schedule: &case.schedule,
    };
    let tto = TestTimeOptimizer::new(
        tto_config,
        tto_models,
        &case.tokenizer,
        TTO_PROMPT,
        PLACEHOLDER,
        CATEGORY,
    )
    .unwrap();
    tch::manual_seed(7);
    let concept = case.category_vector() + randn(&[32]) * 0.3;
    let latents = randn(&[3, 4, PIXELS / 8, PIXELS / 8]);
    let batches = tto.draw_batches(&latents.size(), 11).unwrap();
    assert_eq!(batches.len(), 10);
    let tto_inputs = TtoInputs {
        concept,
        latents,
        batches,
    };
    let tto_inputs_path = case.path("tto_inputs.safetensors");
    write(&tto_inputs_path, tto_inputs.tensors());

    let expected_path = case.path("expected.safetensors");
    let tto_expected_path = case.path("tto_expected.safetensors");
    let model = case.path("model");
    run_reference(
        "replay_reference",
        &[
            "run",
            "--model",
            arg(&model),
            "--replay",
            arg(&replay_path),
            "--prompts",
            arg(&prompts),
            "--placeholder",
            PLACEHOLDER,
            "--category",
            CATEGORY,
            "--stage1-lr",
            &STAGE1_LR.to_string(),
            "--stage2-lr",
            &STAGE2_LR.to_string(),
            "--rescale-record-at",
            &RESCALE.record_at.to_string(),
            "--rescale-until",
            &RESCALE.until.to_string(),
            "--out",
            arg(&expected_path),
            "--tto-inputs",
            arg(&tto_inputs_path),
            "--tto-template",
            TTO_PROMPT,
            "--tto-out",
            arg(&tto_expected_path),
            "--tto-lambda-attn",
            &TTO_LAMBDA_ATTN.to_string(),
        ],
    );

    // Test-time optimization first, on the base U-Net, as the reference ran it.
    check_test_time_optimization(&tto, &tto_inputs, &read(&tto_expected_path));
    drop(tto);
    check_stages(&mut case, prompt_set, &replay, &read(&expected_path));
}

fn check_test_time_optimization(
    tto: &TestTimeOptimizer,
    inputs: &TtoInputs,
    expected: &HashMap<String, Tensor>,
) {
    let stored = inputs.concept.copy();
    let result = tto
        .run(&inputs.concept, &inputs.latents, &inputs.batches)
        .unwrap();
    assert!(
        inputs.concept.equal(&stored),
        "TTO changed the concept's vector"
    );
    let want = &expected["embedding"];
    let err = assert_within("TTO embedding", &result.embedding, want, 1e-4);
    // The update itself, small next to the vector, agrees too.
    let update_err = assert_within(
        "TTO update",
        &(&result.embedding - &inputs.concept),
        &(want - &inputs.concept),
        1e-3,
    );
    let rows: Vec<Vec<f64>> = result
        .losses
        .iter()
        .map(|l| vec![l.embedding, l.attention, l.total])
        .collect();
    assert_history(
        "TTO",
        &["L_emb", "L_attn", "total"],
        &rows,
        &expected["losses"],
    );
    let moved = (&result.embedding - &inputs.concept)
        .abs()
        .max()
        .double_value(&[]);
    eprintln!(
        "TTO embedding error {err:.2e}, update error {update_err:.2e} (largest update {moved:.2e})"
    );
}

fn check_stages(
    case: &mut Case,
    prompt_set: PromptSet,
    replay: &Replay,
    expected: &HashMap<String, Tensor>,
) {
    let prediction_type = case.folder.scheduler.prediction_type;
    let mut config = Stage1Config::new(prompt_set);
    config.steps = STAGE1_STEPS;
    config.batch_size = BATCH as usize;
    config.resolution = PIXELS as usize;
    config.optimizer = AdamWConfig::with_lr(STAGE1_LR);
    config.rescale = Some(RESCALE);
    let models = FrozenModels {
        text_encoder: &case.text_encoder,
        unet: &case.unet,
        vae: &case.vae,
        schedule: &case.schedule,
        prediction_type,
    };
    let stage = Stage1::new(config, models, &case.tokenizer, PLACEHOLDER, CATEGORY).unwrap();
    let mut state = stage.init_state().unwrap();
    let mut losses1 = Vec::new();
    let mut norms = Vec::new();
    for batch in &replay.stage1 {
        let l = stage.step(&mut state, batch).unwrap();
        losses1.push(vec![
            l.diffusion,
            l.embedding.unwrap(),
            l.attention.unwrap(),
            l.total,
        ]);
        norms.push(state.embedding.norm().double_value(&[]));
    }
    let embedding = state.embedding.detach();
    drop(stage);

    let base: HashMap<String, Tensor> = case
        .unet
        .vars
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    let config = Stage2Config {
        steps: STAGE2_STEPS,
        batch_size: BATCH as usize,
        resolution: PIXELS as usize,
        optimizer: AdamWConfig::with_lr(STAGE2_LR),
        ..Default::default()
    };
    let models = Stage2Models {
        text_encoder: &case.text_encoder,
        unet: &mut case.unet,
        unet_config: &case.folder.unet,
        vae: &case.vae,
        schedule: &case.schedule,
        prediction_type,
    };
    let stage = Stage2::new(config, models, &case.tokenizer, PLACEHOLDER, &embedding).unwrap();
    let mut state = stage.init_state().unwrap();
    let losses2: Vec<Vec<f64>> = replay
        .stage2
        .iter()
        .map(|b| vec![stage.step(&mut state, b).unwrap().diffusion])
        .collect();
    drop(stage);

    // S* after stage 1, and the rescaling window in both runs.
    let emb_err = assert_within("embedding", &embedding, &expected["embedding"], 1e-3);
    assert!(
        relative_max_error(&embedding, &case.category_vector()) > 1e-2,
        "S* barely moved: the comparison would prove little"
    );
    assert_rescaled("rust", &norms);
    let ref_norms = Vec::<f64>::try_from(expected["stage1_norms"].to_kind(Kind::Double)).unwrap();
    assert_rescaled("python", &ref_norms);
    assert_history(
        "stage-1",
        &["diffusion", "L_emb", "L_attn", "total"],
        &losses1,
        &expected["stage1_losses"],
    );
    assert_history(
        "stage-2",
        &["diffusion"],
        &losses2,
        &expected["stage2_losses"].view([-1, 1]),
    );

    // The U-Net delta. AdamW divides each gradient element by its own running RMS,
    // so an element whose gradient is a near-cancelling sum (or mathematically zero,
    // like the query/key weights of the tiny model's one-token mid-block
    // self-attention) takes a full-size step set by float rounding: two correct
    // implementations then differ on a few dozen of the 2.4 M elements by up to a few
    // percent of the largest delta. The measure is therefore the relative L2 error
    // ‖Δ_rust − Δ_ref‖₂ / ‖Δ_ref‖₂ of the whole delta (within 1e-3), with every tensor
    // on its own within 5e-2 so that a tensor trained wrongly or not at all (error
    // ≈ 1) cannot hide in the total.
    let mut squared_error = 0.0;
    let mut squared_reference = 0.0;
    let mut errors: Vec<(f64, String)> = Vec::new();
    for (name, tuned) in case.unet.vars.variables() {
        let want = expected
            .get(&format!("unet_delta.{name}"))
            .unwrap_or_else(|| panic!("the reference wrote no delta for {name}"))
            .to_kind(Kind::Double);
        let delta = (tuned.detach() - &base[&name]).to_kind(Kind::Double);
        let error = (&delta - &want)
            .square()
            .sum(Kind::Double)
            .double_value(&[]);
        let reference = want.square().sum(Kind::Double).double_value(&[]);
        squared_error += error;
        squared_reference += reference;
        errors.push(((error / reference).sqrt(), name));
    }
    assert_eq!(
        errors.len(),
        expected
            .keys()
            .filter(|k| k.starts_with("unet_delta."))
            .count()
    );
    errors.sort_by(|a, b| b.0.total_cmp(&a.0));
    let whole = (squared_error / squared_reference).sqrt();
    eprintln!(
        "S* max-abs error {emb_err:.2e}; U-Net delta L2 error {whole:.2e} over {} tensors, \
         largest per tensor {:?}",
        errors.len(),
        &errors[..3]
    );
    assert!(
        whole <= 1e-3,
        "U-Net delta: ‖Δ_rust − Δ_ref‖₂ / ‖Δ_ref‖₂ = {whole:.3e} exceeds 1e-3"
    );
    let (worst, name) = &errors[0];
    assert!(
        *worst <= 5e-2,
        "U-Net delta {name}: relative L2 error {worst:.3e} exceeds 5e-2"
    );
}
