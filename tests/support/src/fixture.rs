//! A temporary directory laid out as the services' tests need it: the tiny model in
//! `model/`, a `file://` store in `store/`, and, as asked, the sample photos in
//! `photos/` or fake concepts in the store. Removed when dropped.
//!
//! Exists so that the trainer's, the sampler's and the end-to-end tests set up the
//! same way.

use std::path::PathBuf;

use coreg::base_model::BaseModel;
use coreg::store::Store;
use tch::Device;

use crate::concept::{self, FakeConcept};
use crate::{model, photos};

pub struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// The tiny model (seed 0) in `model/`; the store is empty.
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        model::write_tiny(&dir.path().join("model"), 0);
        Fixture { dir }
    }

    /// The tiny model and the sample photos in `photos/`.
    pub fn with_photos() -> Fixture {
        let fixture = Fixture::new();
        photos::write_samples(&fixture.path("photos"));
        fixture
    }

    /// The tiny model and, in the store, the concepts `(name, seed)` (each version
    /// `v1`, token `<name>`, category `dog`) as [`FakeConcept::trained`] makes them.
    pub fn with_concepts(concepts: &[(&str, i64)]) -> Fixture {
        let fixture = Fixture::new();
        if !concepts.is_empty() {
            let model = BaseModel::load(&fixture.path("model"), Device::Cpu, None).unwrap();
            let store = fixture.store();
            for (name, seed) in concepts {
                let artifacts = FakeConcept::new(&format!("<{name}>"), *seed).trained(&model, None);
                concept::write(&store, name, "v1", artifacts);
            }
        }
        fixture
    }

    /// `name` inside the directory (`""`: the directory itself).
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

impl Default for Fixture {
    fn default() -> Fixture {
        Fixture::new()
    }
}
