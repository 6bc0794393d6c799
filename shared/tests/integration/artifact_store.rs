//! The object store and the concept artifacts end to end, on `memory:///` and on
//! `file://` in a temporary directory: round trips, create-only semantics, the
//! manifest-last protocol, corruption detection, the U-Net delta's exactness and
//! low-rank error, concept switching without drift, and the embedding's readability by
//! diffusers (through the Python reference).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use coreg::artifact::manifest::roles;
use coreg::artifact::unet_delta::{snapshot, Parameters};
use coreg::artifact::{
    base_model_identity, list_concepts, list_versions, read_concept, read_manifest, write_concept,
    ConceptArtifacts, DeltaSummary, LossHistory, UNetDelta,
};
use coreg::model::{LoadOptions, ModelFolder};
use coreg::store::{CreateOutcome, Store};
use coreg::Error;
use coreg_test_support::concept::FakeConcept;
use coreg_test_support::model;
use coreg_test_support::moto::MotoServer;
use coreg_test_support::reference::{read, run_reference};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn no_options() -> Vec<(String, String)> {
    Vec::new()
}

/// A fresh memory store and a file store rooted at `<tmp>/store/prefix` (the prefix
/// in the URL is kept: objects land below it).
fn stores(tmp: &Path) -> Vec<(Store, Option<PathBuf>)> {
    let root = tmp.join("store/prefix");
    let url = format!("file://{}", root.display());
    vec![
        (Store::open("memory:///", no_options()).unwrap(), None),
        (Store::open(&url, no_options()).unwrap(), Some(root)),
    ]
}

/// A tiny random SD 2.1-architecture model folder.
fn tiny_model(dir: &Path, seed: i64) -> ModelFolder {
    // The tiny model's tensors are too small for intra-op threads to pay off, and with
    // the tests running in parallel they oversubscribe the cores (10× slower).
    tch::set_num_threads(1);
    let root = dir.join(format!("model-{seed}"));
    model::write_tiny(&root, seed);
    ModelFolder::open(&root).unwrap()
}

fn unet_vars(folder: &ModelFolder) -> VarStore {
    folder.load_unet(&LoadOptions::default()).unwrap().vars
}

/// What stage 2 would leave: every parameter nudged, except the first `untouched`
/// (sorted by name), which stay bit-identical.
fn fine_tuned(base: &Parameters, seed: i64, scale: f64, untouched: usize) -> Parameters {
    tch::manual_seed(seed);
    let mut names: Vec<&String> = base.keys().collect();
    names.sort();
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let b = &base[name];
            let t = if i < untouched {
                b.copy()
            } else {
                b + Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * scale
            };
            (name.clone(), t)
        })
        .collect()
}

fn bit_identical(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.view_dtype(Kind::Int).equal(&b.view_dtype(Kind::Int))
}

fn assert_vars_equal(vars: &VarStore, want: &Parameters, what: &str) {
    let vars = vars.variables();
    assert_eq!(vars.len(), want.len());
    for (name, t) in &vars {
        assert!(bit_identical(t, &want[name]), "{what}: `{name}` differs");
    }
}

/// A fake concept with `delta`, and the metadata these tests check the manifest for.
fn artifacts(folder: &ModelFolder, delta: UNetDelta, token: &str) -> ConceptArtifacts {
    let mut losses = LossHistory::default();
    losses
        .stage1
        .insert("total".into(), vec![0.25, 0.125, 0.0625]);
    losses.stage2.insert("diffusion".into(), vec![0.5, 0.375]);
    FakeConcept {
        hyper_parameters: serde_json::json!({"stage1": {"steps": 300, "lr": 5e-3}, "stage2": {"steps": 1000}}),
        training_seed: 42,
        losses,
        ..FakeConcept::new(token, 11)
    }
    .with_delta(folder, delta)
}

#[tokio::test]
async fn objects_round_trip_under_the_url_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    for (store, root) in stores(tmp.path()) {
        store
            .put_overwrite("jobs/j1/spec.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        store
            .put_overwrite("jobs/j1/inputs/0.png", Bytes::from_static(b"png"))
            .await
            .unwrap();
        store
            .put_overwrite("jobs/j2/spec.json", Bytes::from_static(b"[]"))
            .await
            .unwrap();
        assert_eq!(store.get("jobs/j1/spec.json").await.unwrap(), &b"{}"[..]);
        let listed: Vec<(String, u64)> = store
            .list("jobs/j1")
            .await
            .unwrap()
            .into_iter()
            .map(|o| (o.path, o.size))
            .collect();
        assert_eq!(
            listed,
            [
                ("jobs/j1/inputs/0.png".to_owned(), 3),
                ("jobs/j1/spec.json".to_owned(), 2)
            ]
        );
        if let Some(root) = &root {
            assert_eq!(
                std::fs::read(root.join("jobs/j2/spec.json")).unwrap(),
                b"[]"
            );
        }
        store.delete("jobs/j1/spec.json").await.unwrap();
        assert!(matches!(
            store.get("jobs/j1/spec.json").await,
            Err(Error::NotFound { .. })
        ));
        assert_eq!(store.list("jobs/j1").await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn create_only_writes_never_replace() {
    let tmp = tempfile::tempdir().unwrap();
    for (store, _) in stores(tmp.path()) {
        let path = "jobs/j1/lease";
        assert_eq!(
            store
                .put_create_only(path, Bytes::from_static(b"replica-a"))
                .await
                .unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(
            store
                .put_create_only(path, Bytes::from_static(b"replica-b"))
                .await
                .unwrap(),
            CreateOutcome::AlreadyExists
        );
        assert_eq!(store.get(path).await.unwrap(), &b"replica-a"[..]);
    }
}

#[tokio::test]
async fn compare_and_swap_is_refused_on_the_file_system() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = stores(tmp.path()).pop().unwrap();
    assert!(!store.backend().supports_compare_and_swap());
    let created = store
        .put_if_version_matches("state", Bytes::from_static(b"1"), None)
        .await
        .unwrap();
    let coreg::store::ConditionalPut::Written(version) = created else {
        panic!("create-if-absent works on the file system");
    };
    let err = store
        .put_if_version_matches("state", Bytes::from_static(b"2"), Some(version))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("compare-and-swap"), "{err}");
    assert_eq!(store.get("state").await.unwrap(), &b"1"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_blob_all_succeed_with_one_object() {
    let tmp = tempfile::tempdir().unwrap();
    for (store, _) in stores(tmp.path()) {
        let content = Bytes::from(vec![7u8; 1 << 20]);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (store, content) = (store.clone(), content.clone());
                tokio::spawn(async move { store.put_blob(content).await })
            })
            .collect();
        let mut refs = Vec::new();
        for task in tasks {
            refs.push(task.await.unwrap().unwrap());
        }
        assert!(refs.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(refs[0].size, 1 << 20);
        let objects = store.list("blobs").await.unwrap();
        assert_eq!(objects.len(), 1, "{objects:?}");
        assert_eq!(objects[0].path, refs[0].path);
        assert_eq!(store.get_blob(&refs[0]).await.unwrap(), content);
    }
}

#[tokio::test]
async fn a_different_object_at_a_content_address_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = stores(tmp.path()).pop().unwrap();
    let content = Bytes::from_static(b"the real content");
    let blob = coreg::store::BlobRef::of(&content);
    store
        .put_overwrite(&blob.path, Bytes::from_static(b"something else!!"))
        .await
        .unwrap();
    let err = store.put_blob(content).await.unwrap_err();
    assert!(matches!(err, Error::CorruptArtifact { .. }), "{err}");
    assert!(err.to_string().contains(&blob.path), "{err}");
}

#[tokio::test]
async fn concepts_round_trip_and_versions_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 1);
    let mut vars = unet_vars(&folder);
    let base = snapshot(&vars, Device::Cpu).unwrap();
    let tuned = fine_tuned(&base, 5, 1e-3, 3);
    for (store, _) in stores(tmp.path()) {
        let delta = UNetDelta::exact(&base, &tuned).unwrap();
        let written = artifacts(&folder, delta, "<my-dog>");
        let embedding = written.embedding.vector();
        let latents = written.training_latents.copy();
        let identity = written.base_model.clone();
        let manifest_ref = write_concept(&store, "my-dog", "1", written).await.unwrap();
        assert_eq!(manifest_ref.path, "concepts/my-dog/1/manifest.json");
        let stored = store.get(&manifest_ref.path).await.unwrap();
        assert_eq!(
            coreg::store::BlobRef::of(&stored).sha256,
            manifest_ref.sha256
        );

        let loaded = read_concept(&store, "my-dog", "1").await.unwrap();
        let manifest = &loaded.manifest;
        assert_eq!(manifest, &manifest_ref.manifest);
        assert_eq!(
            manifest,
            &read_manifest(&store, "my-dog", "1").await.unwrap()
        );
        assert_eq!(
            (
                manifest.token.as_str(),
                manifest.super_category.as_str(),
                manifest.seed
            ),
            ("<my-dog>", "dog", 42)
        );
        assert_eq!(manifest.software_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(manifest.base_model, identity);
        assert_eq!(manifest.hyper_parameters["stage1"]["steps"], 300);
        assert_eq!(manifest.losses.stage1["total"], [0.25, 0.125, 0.0625]);
        assert_eq!(
            manifest
                .blobs
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            {
                let mut all = roles::ALL.to_vec();
                all.sort();
                all
            }
        );
        for blob in manifest.blobs.values() {
            assert_eq!(blob.path, format!("blobs/sha256/{}", blob.sha256));
        }
        assert_eq!(
            manifest.unet_delta,
            DeltaSummary::Exact {
                parameters: base.len() - 3
            }
        );
        assert!(bit_identical(&loaded.embedding.vector(), &embedding));
        assert!(bit_identical(&loaded.training_latents, &latents));
        loaded.unet_delta.apply(&base, &mut vars).unwrap();
        assert_vars_equal(&vars, &tuned, "tuned weights after a store round trip");

        // The same version again is refused; a new version is added.
        let again = artifacts(&folder, UNetDelta::empty(), "<my-dog>");
        let err = write_concept(&store, "my-dog", "1", again)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
        assert_eq!(
            read_manifest(&store, "my-dog", "1").await.unwrap(),
            manifest_ref.manifest
        );
        let second = artifacts(&folder, UNetDelta::empty(), "<my-dog>");
        write_concept(&store, "my-dog", "2", second).await.unwrap();
        let other = artifacts(&folder, UNetDelta::empty(), "<cat>");
        write_concept(&store, "cat", "v1", other).await.unwrap();
        assert_eq!(list_concepts(&store).await.unwrap(), ["cat", "my-dog"]);
        assert_eq!(list_versions(&store, "my-dog").await.unwrap(), ["1", "2"]);
        assert!(list_versions(&store, "nobody").await.unwrap().is_empty());
        let err = read_concept(&store, "my-dog", "3").await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }
}

#[tokio::test]
async fn a_writer_failing_before_the_manifest_leaves_no_concept() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 1);
    let (store, root) = stores(tmp.path()).pop().unwrap();
    let root = root.unwrap();
    // A dangling link where the `concepts/` folder must go: the manifest is not found
    // (so the write goes ahead), every blob write succeeds, then the manifest write
    // fails, as if the writer had died between the two.
    std::os::unix::fs::symlink(root.join("nowhere"), root.join("concepts")).unwrap();
    let err = write_concept(
        &store,
        "dog",
        "1",
        artifacts(&folder, UNetDelta::empty(), "<dog>"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    assert_eq!(store.list("blobs").await.unwrap().len(), roles::ALL.len());
    std::fs::remove_file(root.join("concepts")).unwrap();
    assert!(list_concepts(&store).await.unwrap().is_empty());
    assert!(list_versions(&store, "dog").await.unwrap().is_empty());
    assert!(matches!(
        read_concept(&store, "dog", "1").await,
        Err(Error::NotFound { .. })
    ));

    // Retrying reuses the blobs already there (verified) and completes the concept.
    write_concept(
        &store,
        "dog",
        "1",
        artifacts(&folder, UNetDelta::empty(), "<dog>"),
    )
    .await
    .unwrap();
    assert_eq!(list_concepts(&store).await.unwrap(), ["dog"]);
    assert_eq!(store.list("blobs").await.unwrap().len(), roles::ALL.len());
}

#[tokio::test]
async fn corrupt_or_missing_blobs_are_reported_as_corrupt_data() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 1);
    let vars = unet_vars(&folder);
    let base = snapshot(&vars, Device::Cpu).unwrap();
    let tuned = fine_tuned(&base, 6, 1e-3, 0);
    let (store, root) = stores(tmp.path()).pop().unwrap();
    let root = root.unwrap();
    let delta = UNetDelta::exact(&base, &tuned).unwrap();
    let manifest = write_concept(&store, "dog", "1", artifacts(&folder, delta, "<dog>"))
        .await
        .unwrap()
        .manifest;
    let blob = &manifest.blobs[roles::UNET_DELTA];
    let file = root.join(&blob.path);

    // One flipped byte, same size.
    let original = std::fs::read(&file).unwrap();
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    std::fs::write(&file, &flipped).unwrap();
    let err = read_concept(&store, "dog", "1").await.unwrap_err();
    match &err {
        Error::CorruptArtifact { path, message } => {
            assert_eq!(path, &blob.path);
            assert!(message.contains("sha256"), "{message}");
        }
        other => panic!("expected corrupt data, got {other}"),
    }
    // Truncated.
    std::fs::write(&file, &original[..original.len() - 1]).unwrap();
    let err = read_concept(&store, "dog", "1").await.unwrap_err();
    assert!(
        matches!(&err, Error::CorruptArtifact { message, .. } if message.contains("size")),
        "{err}"
    );
    // Missing.
    std::fs::remove_file(&file).unwrap();
    let err = read_concept(&store, "dog", "1").await.unwrap_err();
    assert!(
        matches!(&err, Error::CorruptArtifact { message, .. } if message.contains("missing")),
        "{err}"
    );
    // Restored: readable again.
    std::fs::write(&file, &original).unwrap();
    read_concept(&store, "dog", "1").await.unwrap();

    // A manifest that is not JSON.
    let manifest_file = root.join("concepts/dog/1/manifest.json");
    std::fs::write(&manifest_file, b"{not json").unwrap();
    let err = read_concept(&store, "dog", "1").await.unwrap_err();
    assert!(matches!(err, Error::CorruptArtifact { .. }), "{err}");
}

#[test]
fn exact_delta_reproduces_the_tuned_unet_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 2);
    let mut vars = unet_vars(&folder);
    let base = snapshot(&vars, Device::Cpu).unwrap();
    // Updates of a fine-tune's size, and large ones that make fp32 subtraction lossy.
    for (seed, scale) in [(1, 2e-6), (2, 1e-3), (3, 1.0)] {
        let tuned = fine_tuned(&base, seed, scale, 4);
        let delta = UNetDelta::exact(&base, &tuned).unwrap();
        assert_eq!(delta.len(), base.len() - 4);
        let bytes = delta.to_bytes().unwrap();
        let decoded = UNetDelta::from_bytes(&bytes).unwrap();
        decoded.apply(&base, &mut vars).unwrap();
        assert_vars_equal(&vars, &tuned, &format!("scale {scale}"));
    }
    let identical = UNetDelta::exact(&base, &base).unwrap();
    assert!(identical.is_empty());
}

#[test]
fn low_rank_errors_match_the_singular_values() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 3);
    let mut vars = unet_vars(&folder);
    let base = snapshot(&vars, Device::Cpu).unwrap();
    let tuned = fine_tuned(&base, 9, 1e-2, 0);
    let rank = 4;
    let delta = UNetDelta::low_rank(&base, &tuned, rank).unwrap();
    let DeltaSummary::LowRank {
        rank: recorded_rank,
        parameters,
        overall_relative_error,
        relative_errors,
    } = UNetDelta::from_bytes(&delta.to_bytes().unwrap())
        .unwrap()
        .summary()
    else {
        panic!("expected a low-rank summary");
    };
    assert_eq!((recorded_rank, parameters), (rank, base.len()));

    // Direct computation: the Eckart–Young error of each factorable 2-D or 4-D Δ.
    let (mut error_sq, mut norm_sq) = (0.0, 0.0);
    let mut factored = 0;
    for (name, t) in &tuned {
        let d = (t - &base[name]).to_kind(Kind::Double);
        let shape = d.size();
        let norm = d.square().sum(Kind::Double).double_value(&[]);
        norm_sq += norm;
        let (rows, cols) = (shape[0], d.numel() as i64 / shape[0]);
        if !(shape.len() == 2 || shape.len() == 4) || rank * (rows + cols) >= rows * cols {
            assert!(
                !relative_errors.contains_key(name),
                "{name} must stay exact"
            );
            continue;
        }
        factored += 1;
        let (_, s, _) = d.reshape([rows, cols]).svd(true, false);
        let tail = s
            .narrow(0, rank, s.size()[0] - rank)
            .square()
            .sum(Kind::Double);
        let tail = tail.double_value(&[]);
        error_sq += tail;
        let want = (tail / norm).sqrt();
        let got = relative_errors[name];
        assert!(
            (got - want).abs() <= 1e-4 * want + 1e-6,
            "{name}: recorded {got}, singular values give {want}"
        );
    }
    assert!(factored > 10, "only {factored} layers were factorable");
    assert_eq!(relative_errors.len(), factored);
    let want = (error_sq / norm_sq).sqrt();
    assert!(
        (overall_relative_error - want).abs() <= 1e-4 * want,
        "overall: recorded {overall_relative_error}, direct {want}"
    );
    assert!(overall_relative_error > 0.1, "random Δ is not low rank");

    // The applied weights carry exactly the recorded error.
    delta.apply(&base, &mut vars).unwrap();
    let applied = vars.variables();
    let (name, recorded) = relative_errors.iter().next().unwrap();
    let want_delta = &tuned[name] - &base[name];
    let got_delta = &applied[name] - &base[name];
    let measured =
        ((&got_delta - &want_delta).norm().double_value(&[])) / want_delta.norm().double_value(&[]);
    assert!(
        (measured - recorded).abs() <= 1e-3 * recorded,
        "{name}: applied error {measured}, recorded {recorded}"
    );
}

#[test]
fn switching_concepts_a_hundred_times_leaves_no_drift() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 4);
    let mut vars = unet_vars(&folder);
    let base = snapshot(&vars, Device::Cpu).unwrap();
    let pristine: Parameters = base.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let tuned_a = fine_tuned(&base, 21, 1e-3, 0);
    let tuned_b = fine_tuned(&base, 22, 1e-3, 5);
    let a = UNetDelta::exact(&base, &tuned_a).unwrap();
    let b = UNetDelta::low_rank(&base, &tuned_b, 2).unwrap();
    for i in 0..100 {
        let delta = if i % 2 == 0 { &a } else { &b };
        delta.apply(&base, &mut vars).unwrap();
    }
    a.apply(&base, &mut vars).unwrap();
    assert_vars_equal(&vars, &tuned_a, "concept A after 100 switches");
    UNetDelta::empty().apply(&base, &mut vars).unwrap();
    assert_vars_equal(&vars, &pristine, "base after 100 switches");
    for (name, t) in &base {
        assert!(
            bit_identical(t, &pristine[name]),
            "base copy `{name}` changed"
        );
    }

    // A delta for another architecture is refused before anything is written.
    let mut foreign: Parameters = base
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    foreign.insert(
        "not.a.unet.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    );
    let mut foreign_tuned: Parameters = foreign
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    foreign_tuned.insert(
        "not.a.unet.weight".into(),
        Tensor::ones([2], (Kind::Float, Device::Cpu)),
    );
    let err = UNetDelta::exact(&foreign, &foreign_tuned)
        .unwrap()
        .apply(&base, &mut vars)
        .unwrap_err();
    assert!(err.to_string().contains("not.a.unet.weight"), "{err}");
    assert_vars_equal(&vars, &pristine, "base after a refused delta");
}

#[test]
fn base_model_identity_hashes_weights_and_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 5);
    let identity = base_model_identity(&folder).unwrap();
    assert_eq!(identity.name, "model-5");
    let paths: Vec<&str> = identity.files.iter().map(|f| f.path.as_str()).collect();
    for want in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        assert!(paths.contains(&want), "{want} not hashed: {paths:?}");
    }
    let unet_file = folder.root.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet_file).unwrap();
    let entry = identity
        .files
        .iter()
        .find(|f| f.path == "unet/diffusion_pytorch_model.safetensors")
        .unwrap();
    assert_eq!(entry.size, bytes.len() as u64);
    assert_eq!(entry.sha256, coreg::store::BlobRef::of(&bytes).sha256);

    // The same files elsewhere give the same identity hash; one changed byte does not.
    let copy = tmp.path().join("copy");
    copy_dir(&folder.root, &copy);
    let copied = base_model_identity(&ModelFolder::open(&copy).unwrap()).unwrap();
    assert_eq!(copied.sha256, identity.sha256);
    let mut changed = bytes;
    let last = changed.len() - 1;
    changed[last] ^= 1;
    std::fs::write(
        copy.join("unet/diffusion_pytorch_model.safetensors"),
        changed,
    )
    .unwrap();
    let changed = base_model_identity(&ModelFolder::open(&copy).unwrap()).unwrap();
    assert_ne!(changed.sha256, identity.sha256);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn hostile_concept_names_are_rejected_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 1);
    let store = Store::open("memory:///", no_options()).unwrap();
    let long = "a".repeat(300);
    for name in ["../x", "", long.as_str(), "a/b", "..", "x/../../etc"] {
        let err = write_concept(
            &store,
            name,
            "1",
            artifacts(&folder, UNetDelta::empty(), "<x>"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{name:?}: {err}");
        assert!(err.to_string().contains("concept name"), "{err}");
        assert!(matches!(
            read_concept(&store, name, "1").await,
            Err(Error::InvalidInput(_))
        ));
        assert!(list_versions(&store, name).await.is_err());
        let err = write_concept(
            &store,
            "ok",
            name,
            artifacts(&folder, UNetDelta::empty(), "<x>"),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("concept version"), "{err}");
    }
    assert!(store.list("").await.unwrap().is_empty());

    // A NaN loss is refused before any blob is written.
    let mut broken = artifacts(&folder, UNetDelta::empty(), "<x>");
    broken
        .losses
        .stage1
        .insert("total".into(), vec![0.1, f32::NAN]);
    let err = write_concept(&store, "ok", "1", broken).await.unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    assert!(store.list("").await.unwrap().is_empty());
}

#[test]
fn unknown_store_option_keys_are_rejected_by_name() {
    let err = Store::open(
        "s3://bucket/coreg",
        [
            ("aws_secret_acess_key", "typo"),
            ("aws_region", "us-east-1"),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)));
    assert!(err.to_string().contains("`aws_secret_acess_key`"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("s").display());
    let err = Store::open(&url, [("root", "/")]).unwrap_err();
    assert!(err.to_string().contains("`root`"), "{err}");
}

/// The same protocol on a real S3 API: conditional writes are honoured there, so
/// create-only, content-addressed blobs and compare-and-swap all hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_holds_on_the_s3_api() {
    let moto = MotoServer::start();
    moto.create_bucket("coreg-test");
    let store = Store::open("s3://coreg-test/deploy/a", moto.options()).unwrap();
    assert!(store.backend().supports_compare_and_swap());

    let path = "jobs/j1/lease";
    assert_eq!(
        store
            .put_create_only(path, Bytes::from_static(b"replica-a"))
            .await
            .unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        store
            .put_create_only(path, Bytes::from_static(b"replica-b"))
            .await
            .unwrap(),
        CreateOutcome::AlreadyExists
    );
    let (bytes, version) = store.get_versioned(path).await.unwrap();
    assert_eq!(bytes, &b"replica-a"[..]);
    let written = store
        .put_if_version_matches(
            path,
            Bytes::from_static(b"replica-b"),
            Some(version.clone()),
        )
        .await
        .unwrap();
    assert!(matches!(written, coreg::store::ConditionalPut::Written(_)));
    let stale = store
        .put_if_version_matches(path, Bytes::from_static(b"replica-c"), Some(version))
        .await
        .unwrap();
    assert_eq!(stale, coreg::store::ConditionalPut::Conflict);
    assert_eq!(store.get(path).await.unwrap(), &b"replica-b"[..]);

    let content = Bytes::from(vec![3u8; 300_000]);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, content) = (store.clone(), content.clone());
            tokio::spawn(async move { store.put_blob(content).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(store.list("blobs").await.unwrap().len(), 1);

    let tmp = tempfile::tempdir().unwrap();
    let folder = tiny_model(tmp.path(), 1);
    let vars = unet_vars(&folder);
    let base = snapshot(&vars, Device::Cpu).unwrap();
    let tuned = fine_tuned(&base, 7, 1e-3, 0);
    let delta = UNetDelta::exact(&base, &tuned).unwrap();
    write_concept(&store, "dog", "1", artifacts(&folder, delta, "<dog>"))
        .await
        .unwrap();
    let err = write_concept(
        &store,
        "dog",
        "1",
        artifacts(&folder, UNetDelta::empty(), "<dog>"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");
    let loaded = read_concept(&store, "dog", "1").await.unwrap();
    assert_eq!(loaded.unet_delta.len(), base.len());
    assert_eq!(list_concepts(&store).await.unwrap(), ["dog"]);
    // The URL's prefix scopes the store: another prefix in the same bucket is empty.
    let other = Store::open("s3://coreg-test/deploy/b", moto.options()).unwrap();
    assert!(list_concepts(&other).await.unwrap().is_empty());

    streams_tensors_in_parts_and_reads_them_in_ranges(&store).await;
}

/// A 40 MB tensor file goes up as an S3 multipart upload of three 16 MiB parts (moto
/// refuses parts under 5 MiB but the last, as S3 does) and comes back by ranged reads
/// bit for bit; as a content-addressed blob it hashes as its bytes and reads back
/// verified in ranges.
async fn streams_tensors_in_parts_and_reads_them_in_ranges(store: &Store) {
    use coreg::artifact::tensor_file::{encode, read_blob, read_from_store, TensorFile};
    let big = Tensor::randn([10_000_000], (Kind::Float, Device::Cpu));
    let half = Tensor::randn([3, 1001], (Kind::BFloat16, Device::Cpu));
    let named = [("big".to_owned(), &big), ("half".to_owned(), &half)];
    let file = TensorFile::new(&named, Default::default()).unwrap();
    assert!(file.size() > 2 * coreg::store::PART_BYTES as u64);
    let written = store
        .put_streamed("jobs/j1/checkpoints/s.safetensors", &mut file.reader())
        .await
        .unwrap();
    let in_memory = encode(&named, Default::default()).unwrap();
    assert_eq!(written.size, in_memory.len() as u64);
    assert_eq!(written.sha256, coreg::store::BlobRef::of(&in_memory).sha256);
    let (tensors, _) = read_from_store(store, "jobs/j1/checkpoints/s.safetensors")
        .await
        .unwrap();
    assert!(tensors["big"].equal(&big) && tensors["half"].equal(&half));
    let blob = store
        .put_blob_streamed(move || Ok(Box::new(file.reader())))
        .await
        .unwrap();
    assert_eq!(blob, coreg::store::BlobRef::of(&in_memory));
    let (tensors, _) = read_blob(store, &blob).await.unwrap();
    assert!(tensors["big"].equal(&big) && tensors["half"].equal(&half));
}

/// The cloud SDK's variables configure an s3:// store the way `aws` would read them;
/// explicit options win over them key by key, aliases included, and variables that
/// are not S3 options are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_options_come_from_the_environment_and_explicit_ones_win() {
    let moto = MotoServer::start();
    moto.create_bucket("coreg-env");
    let as_environment = |options: Vec<(String, String)>| -> Vec<(String, String)> {
        options
            .into_iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v))
            .chain([
                ("AWS_PROFILE".to_owned(), "not-an-option".to_owned()),
                ("GOOGLE_SERVICE_ACCOUNT".to_owned(), "/nowhere".to_owned()),
                ("PATH".to_owned(), "/usr/bin".to_owned()),
            ])
            .collect()
    };
    let environment = as_environment(moto.options());

    // Everything from the environment.
    let store = Store::open_with_environment("s3://coreg-env/p", no_options(), environment.clone())
        .unwrap();
    store
        .put_overwrite("hello", Bytes::from_static(b"from the environment"))
        .await
        .unwrap();

    // A second S3 API tells which endpoint a store used: an explicit endpoint
    // (under its alias `endpoint`) beats the environment's, and the other way round.
    let other = MotoServer::start();
    other.create_bucket("coreg-env");
    let endpoint = |server: &MotoServer| -> String {
        server
            .options()
            .into_iter()
            .find(|(k, _)| k == "aws_endpoint")
            .unwrap()
            .1
    };
    let store = Store::open_with_environment(
        "s3://coreg-env/p",
        [("endpoint", endpoint(&other))],
        environment.clone(),
    )
    .unwrap();
    let err = store.get("hello").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let other_environment = as_environment(other.options());
    let store = Store::open_with_environment(
        "s3://coreg-env/p",
        [("aws_endpoint", endpoint(&moto))],
        other_environment.clone(),
    )
    .unwrap();
    assert_eq!(
        store.get("hello").await.unwrap(),
        &b"from the environment"[..]
    );
    // Without the explicit one, the environment's endpoint is used.
    let store =
        Store::open_with_environment("s3://coreg-env/p", no_options(), other_environment).unwrap();
    assert!(matches!(
        store.get("hello").await.unwrap_err(),
        Error::NotFound { .. }
    ));
}

/// The stored blobs, read by diffusers' `load_textual_inversion` and by the
/// AUTOMATIC1111 loading rules, give the token the vector Rust wrote, with the id the
/// Rust tokenizer assigns.
#[tokio::test]
async fn stored_embeddings_load_in_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("case");
    let case_str = case.to_str().unwrap();
    run_reference(
        "model_reference",
        &[
            "make-model",
            "--config",
            "tiny",
            "--seed",
            "3",
            "--out",
            case_str,
        ],
    );
    let folder = ModelFolder::open(case.join("model")).unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&format!("file://{}", root.display()), no_options()).unwrap();
    let written = artifacts(&folder, UNetDelta::empty(), "<my-dog>");
    let vector = written.embedding.vector();
    let manifest = write_concept(&store, "my-dog", "1", written)
        .await
        .unwrap()
        .manifest;
    let blob_file = |role: &str| root.join(&manifest.blobs[role].path);
    let out = tmp.path().join("out.safetensors");
    run_reference(
        "embedding_reference",
        &[
            "--model",
            case.join("model").to_str().unwrap(),
            "--learned-embeds",
            blob_file(roles::EMBEDDING).to_str().unwrap(),
            "--a1111",
            blob_file(roles::EMBEDDING_A1111).to_str().unwrap(),
            "--a1111-token",
            "<a1111-dog>",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let got: HashMap<String, Tensor> = read(&out);
    let mut tokenizer = folder.tokenizer().unwrap();
    let base_vocab = got["base_vocab"].int64_value(&[0]);
    assert_eq!(base_vocab, 49408);
    let rust_ids: BTreeMap<&str, i64> = [
        (
            "learned_embeds",
            tokenizer.add_placeholder("<my-dog>").unwrap(),
        ),
        ("a1111", tokenizer.add_placeholder("<a1111-dog>").unwrap()),
    ]
    .into_iter()
    .collect();
    for (name, token) in [("learned_embeds", "<my-dog>"), ("a1111", "<a1111-dog>")] {
        let token_id = got[&format!("{name}_token_id")].int64_value(&[0]);
        assert_eq!(token_id, rust_ids[name], "{name}: token id");
        assert!(
            bit_identical(&got[&format!("{name}_row")], &vector),
            "{name}: diffusers' embedding row differs from the stored vector"
        );
        let python_ids =
            Vec::<i64>::try_from(got[&format!("{name}_prompt_ids")].view([-1])).unwrap();
        let rust_prompt = tokenizer.encode(&format!("a photo of a {token}")).unwrap();
        assert_eq!(python_ids, rust_prompt.ids, "{name}: prompt ids");
        assert_eq!(python_ids[5], token_id);
    }
}
