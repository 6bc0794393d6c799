//! The tiny random model, loaded and frozen, for the unit tests of stage 1, stage 2
//! and test-time optimization.

use tch::nn::VarStore;
use tch::Tensor;

use crate::method::stage1::FrozenModels;
use crate::model::clip::ClipTextTransformer;
use crate::model::random::{write_random_model, ModelSize};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::model::Component;
use crate::model::{LoadOptions, ModelFolder};
use crate::schedule::{NoiseSchedule, PredictionType};

pub(crate) struct Loaded {
    pub dir: tempfile::TempDir,
    pub folder: ModelFolder,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: Component<ClipTextTransformer>,
    pub unet: Component<UNet2DConditionModel>,
    pub vae: Component<AutoencoderKl>,
    pub schedule: NoiseSchedule,
}

impl Loaded {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("model");
        write_random_model(&root, ModelSize::Tiny, PredictionType::Epsilon, 5).unwrap();
        let folder = ModelFolder::open(&root).unwrap();
        let mut tokenizer = folder.tokenizer().unwrap();
        tokenizer.add_placeholder("<concept>").unwrap();
        let opts = LoadOptions::default();
        Loaded {
            tokenizer,
            text_encoder: folder.load_text_encoder(&opts).unwrap(),
            unet: folder.load_unet(&opts).unwrap(),
            vae: folder.load_vae(&opts).unwrap(),
            schedule: NoiseSchedule::new(&folder.scheduler).unwrap(),
            folder,
            dir,
        }
    }

    pub fn frozen(&self) -> FrozenModels<'_> {
        FrozenModels {
            text_encoder: &self.text_encoder,
            unet: &self.unet,
            vae: &self.vae,
            schedule: &self.schedule,
            prediction_type: self.folder.scheduler.prediction_type,
        }
    }
}

/// Standard normal draws of `shape` from a seeded stream of their own: tests run
/// in parallel threads, which would interleave draws from libtorch's one global
/// generator.
pub fn normal(seed: u64, shape: &[i64]) -> Tensor {
    use rand::SeedableRng;
    crate::draws::standard_normal(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed), shape)
}

/// Every variable of `vars`, copied, by name.
pub fn snapshot(vars: &VarStore) -> Vec<(String, Tensor)> {
    let mut all: Vec<_> = vars
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Whether `vars` still hold the `before` values and collected no gradient.
pub fn unchanged(vars: &VarStore, before: &[(String, Tensor)]) -> bool {
    let mut now: Vec<_> = vars.variables().into_iter().collect();
    now.sort_by(|a, b| a.0.cmp(&b.0));
    now.len() == before.len()
        && now
            .iter()
            .zip(before)
            .all(|((n, a), (m, b))| n == m && a.equal(b) && !a.grad().defined())
}
