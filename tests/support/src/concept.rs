//! A fake concept, as the trainer would store one, without training: a placeholder
//! token's vector, a U-Net delta, training latents and the manifest's metadata, drawn
//! reproducibly from a seed; and writing it to a store.
//!
//! Exists so that the store's, the sampler's and the end-to-end tests build concepts
//! one way; what a test needs to differ (the seed, the delta's rank, the metadata it
//! checks) is a parameter here, not a copy of this code.

use coreg::artifact::unet_delta::Parameters;
use coreg::artifact::{
    base_model_identity, write_concept, ConceptArtifacts, LearnedEmbedding, LossHistory, UNetDelta,
};
use coreg::base_model::BaseModel;
use coreg::model::ModelFolder;
use coreg::store::Store;
use tch::{Device, Kind, Tensor};

/// What a fake concept is made of, besides its tensors.
#[derive(Debug, Clone)]
pub struct FakeConcept {
    /// The placeholder token, e.g. `<toy>`.
    pub token: String,
    /// Seeds the global torch generator before anything is drawn, so the same
    /// `FakeConcept` gives the same tensors.
    pub seed: i64,
    pub category: String,
    pub hyper_parameters: serde_json::Value,
    /// The training seed the manifest records.
    pub training_seed: u64,
    pub losses: LossHistory,
}

impl FakeConcept {
    /// `token`, drawn from `seed`, of category "dog", with no hyper-parameters,
    /// training seed 0 and no loss history.
    pub fn new(token: &str, seed: i64) -> FakeConcept {
        FakeConcept {
            token: token.to_owned(),
            seed,
            category: "dog".to_owned(),
            hyper_parameters: serde_json::json!({}),
            training_seed: 0,
            losses: LossHistory::default(),
        }
    }

    /// As training would leave it on `model` (freshly loaded: its U-Net the base):
    /// the category word's vector moved a little (σ 0.05), every U-Net weight nudged
    /// (σ 1e-2, drawn in name order, not in a `HashMap`'s), stored exactly or, with
    /// `rank`, as low-rank factors; random training latents.
    pub fn trained(&self, model: &BaseModel, rank: Option<i64>) -> ConceptArtifacts {
        tch::manual_seed(self.seed);
        let word_id = model.tokenizer.single_token_id(&self.category).unwrap();
        let word = tch::no_grad(|| {
            model
                .text_encoder
                .model
                .token_embedding(&Tensor::from_slice(&[word_id]))
                .get(0)
        });
        let vector = &word + Tensor::randn_like(&word) * 0.05;
        let base = model.base_unet();
        let mut names: Vec<&String> = base.keys().collect();
        names.sort();
        let tuned: Parameters = names
            .into_iter()
            .map(|name| {
                let t = &base[name];
                (name.clone(), t + Tensor::randn_like(t) * 1e-2)
            })
            .collect();
        let unet_delta = match rank {
            None => UNetDelta::exact(base, &tuned).unwrap(),
            Some(rank) => UNetDelta::low_rank(base, &tuned, rank).unwrap(),
        };
        self.artifacts(&model.folder, vector, unet_delta)
    }

    /// With the given `unet_delta` and a random vector as wide as `folder`'s text
    /// encoder: for the tests of the artifacts themselves.
    pub fn with_delta(&self, folder: &ModelFolder, unet_delta: UNetDelta) -> ConceptArtifacts {
        tch::manual_seed(self.seed);
        let vector = Tensor::randn(
            [folder.text_encoder.hidden_size as i64],
            (Kind::Float, Device::Cpu),
        );
        self.artifacts(folder, vector, unet_delta)
    }

    /// The artifacts around `vector` and `unet_delta`; draws the training latents.
    fn artifacts(
        &self,
        folder: &ModelFolder,
        vector: Tensor,
        unet_delta: UNetDelta,
    ) -> ConceptArtifacts {
        ConceptArtifacts {
            embedding: LearnedEmbedding::new(&self.token, &vector).unwrap(),
            unet_delta,
            training_latents: Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu)),
            super_category: self.category.clone(),
            base_model: base_model_identity(folder).unwrap(),
            hyper_parameters: self.hyper_parameters.clone(),
            seed: self.training_seed,
            losses: self.losses.clone(),
        }
    }
}

/// Writes `artifacts` to `store` as `name`/`version`, on a thread and runtime of its
/// own, so that sync tests and async tests (from inside their runtime) both can.
pub fn write(store: &Store, name: &str, version: &str, artifacts: ConceptArtifacts) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(write_concept(store, name, version, artifacts))
                    .unwrap_or_else(|e| panic!("writing concept {name}/{version}: {e}"))
            })
            .join()
            .unwrap()
    });
}
