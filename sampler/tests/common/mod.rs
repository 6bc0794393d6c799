//! What the sampler's tests share: the tiny random model and concepts written to a
//! `file://` store the way the trainer writes them, and `coreg-sampler serve` child
//! processes on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use coreg::artifact::unet_delta::{snapshot, Parameters};
use coreg::artifact::{
    base_model_identity, write_concept, ConceptArtifacts, LearnedEmbedding, LossHistory, UNetDelta,
};
use coreg::base_model::BaseModel;
use coreg::model::random::{write_random_model, ModelSize};
use coreg::schedule::PredictionType;
use coreg::store::Store;
use coreg_proto::v1 as pb;
use pb::sampler_service_client::SamplerServiceClient;
use tch::{Device, Kind, Tensor};
use tonic::transport::Channel;

#[path = "../../../tests/support/service_process.rs"]
mod service_process;

pub use service_process::Server;

impl Server {
    /// `coreg-sampler serve` on the model in `model` and the store at `store`, with
    /// `extra` settings.
    pub fn start(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
        Server::spawn(
            env!("CARGO_BIN_EXE_coreg-sampler"),
            model,
            store,
            log,
            extra,
        )
    }

    /// `coreg-trainer serve` (the trainer crate's binary, which `make test` builds
    /// beside this one) on the model in `model` and the store at `store`, with
    /// `extra` settings; it polls for jobs every 200 ms.
    pub fn start_trainer(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
        let binary = trainer_binary();
        let mut settings = vec![("COREG_POLL_MILLISECONDS", "200")];
        settings.extend_from_slice(extra);
        Server::spawn(binary.to_str().unwrap(), model, store, log, &settings)
    }

    pub async fn client(&self) -> SamplerServiceClient<Channel> {
        SamplerServiceClient::connect(self.url())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    }
}

/// `coreg-trainer`, next to this crate's `coreg-sampler` in the target directory.
/// Cargo builds only this crate's binaries for its tests, so a missing trainer fails
/// with how to build it.
pub fn trainer_binary() -> PathBuf {
    let sampler = Path::new(env!("CARGO_BIN_EXE_coreg-sampler"));
    let trainer = sampler.with_file_name(format!("coreg-trainer{}", std::env::consts::EXE_SUFFIX));
    assert!(
        trainer.is_file(),
        "no coreg-trainer binary at {} (these tests run it beside coreg-sampler: build it \
         with `cargo build -p coreg-trainer`, or run `make test`, which builds the workspace)",
        trainer.display()
    );
    trainer
}

/// A temp dir holding the tiny model (`model/`) and a `file://` store (`store/`).
pub struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// The tiny model and the concepts `(name, seed)`, each version `v1`, token
    /// `<name>`, category `dog`.
    pub fn new(concepts: &[(&str, i64)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("model");
        write_random_model(&model_dir, ModelSize::Tiny, PredictionType::Epsilon, 0).unwrap();
        let fixture = Fixture { dir };
        if !concepts.is_empty() {
            let model = BaseModel::load(&model_dir, Device::Cpu, None).unwrap();
            let store = fixture.store();
            for (name, seed) in concepts {
                let artifacts = test_concept(&model, &format!("<{name}>"), *seed);
                // On a thread of its own: async tests call this from their runtime.
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| {
                            tokio::runtime::Runtime::new()
                                .unwrap()
                                .block_on(write_concept(&store, name, "v1", artifacts))
                                .unwrap()
                        })
                        .join()
                        .unwrap()
                });
            }
        }
        fixture
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn store_url(&self) -> String {
        format!("file://{}", self.path("store").display())
    }

    pub fn store(&self) -> Store {
        Store::open(&self.store_url(), Vec::<(String, String)>::new()).unwrap()
    }
}

/// A concept as the trainer would store it: the word "dog"'s embedding nudged, every
/// U-Net weight nudged, random training latents; reproducible from `seed` (weights are
/// nudged in name order, not in a `HashMap`'s).
pub fn test_concept(model: &BaseModel, token: &str, seed: i64) -> ConceptArtifacts {
    tch::manual_seed(seed);
    let dog = model.tokenizer.single_token_id("dog").unwrap();
    let word = tch::no_grad(|| {
        model
            .text_encoder
            .model
            .token_embedding(&Tensor::from_slice(&[dog]))
            .get(0)
    });
    let embedding = &word + Tensor::randn_like(&word) * 0.05;
    let base = snapshot(&model.unet.vars, Device::Cpu).unwrap();
    let mut names: Vec<&String> = base.keys().collect();
    names.sort();
    let tuned: Parameters = names
        .into_iter()
        .map(|name| {
            let t = &base[name];
            (name.clone(), t + Tensor::randn_like(t) * 1e-2)
        })
        .collect();
    ConceptArtifacts {
        embedding: LearnedEmbedding::new(token, &embedding).unwrap(),
        unet_delta: UNetDelta::exact(&base, &tuned).unwrap(),
        training_latents: Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu)),
        super_category: "dog".into(),
        base_model: base_model_identity(&model.folder).unwrap(),
        hyper_parameters: serde_json::json!({}),
        seed: 0,
        losses: LossHistory::default(),
    }
}
