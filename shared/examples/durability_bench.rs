//! What writing SD 2.1-sized state costs: a stage-2 checkpoint (the U-Net and AdamW's
//! two moments, 10.4 GB) and a concept's exact U-Net delta (3.4 GB), streamed in parts
//! by the code the trainer runs (`TensorFile` readers into `Store::put_streamed` /
//! `put_blob_streamed`), with the `full` model shape and random weights. For each: the
//! bytes written, the seconds, and how much the process's peak resident set grew
//! during the write, next to the size of the data. Then what the default checkpoint
//! cadence spends checkpointing in a stage 2 at an assumed 0.5 s/step GPU and a
//! 200 MB/s store (or the measured throughput, if lower).
//!
//! Usage: `durability_bench --checkpoint-store URL --concept-store URL [--options K=V..]`
//! (bench/durability.sh runs it against a `file://` folder and the S3 API). Prints one
//! JSON object.

use std::time::{Duration, Instant};

use coreg::artifact::tensor_file::TensorFile;
use coreg::artifact::unet_delta::{snapshot, Parameters, UNetDelta};
use coreg::cadence::{simulate, CadencePolicy, DEFAULT_MAX_COST_FRACTION};
use coreg::model::config::UNetConfig;
use coreg::model::random::{configs, ModelSize};
use coreg::model::unet::UNet2DConditionModel;
use coreg::schedule::config::PredictionType;
use coreg::store::Store;
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// Kilobytes of a `/proc/self/status` field.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("a VmHWM/VmRSS line")
}

/// Runs `write` and reports its duration and the growth of the peak resident set over
/// the resident set before it (the kernel's peak is reset first: clear_refs 5).
fn measured<T>(write: impl FnOnce() -> T) -> (T, Duration, u64) {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident set");
    let before = status_kb("VmRSS:");
    let started = Instant::now();
    let result = write();
    let took = started.elapsed();
    let growth = status_kb("VmHWM:").saturating_sub(before) * 1024;
    (result, took, growth)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The store at `url`; an `s3://` one with `--options`.
fn open(url: &str) -> Store {
    if !url.starts_with("s3://") {
        return Store::open(url, Vec::<(String, String)>::new()).expect("opening the store");
    }
    let options: Vec<(String, String)> = arg("--options")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Store::open(url, options).expect("opening the store")
}

fn bytes_of(tensors: &[(String, Tensor)]) -> u64 {
    tensors
        .iter()
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum()
}

fn main() {
    tch::manual_seed(0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config: UNetConfig =
        serde_json::from_value(configs(ModelSize::Full, PredictionType::VPrediction).unet).unwrap();
    let vars = VarStore::new(Device::Cpu);
    let _unet = UNet2DConditionModel::new(vars.root(), &config);
    let weights = snapshot(&vars, Device::Cpu).unwrap();
    drop(vars);

    // A stage-2 checkpoint: the weights and two moments of their shapes (touched, so
    // that their pages are resident before the write starts).
    let mut state: Vec<(String, Tensor)> = Vec::new();
    for (name, w) in &weights {
        state.push((format!("unet.{name}"), w.shallow_clone()));
        state.push((format!("exp_avg.{name}"), w * 0.1));
        state.push((format!("exp_avg_sq.{name}"), w * w));
    }
    let checkpoint_bytes = bytes_of(&state);
    let store = open(&arg("--checkpoint-store").expect("--checkpoint-store URL"));
    let (written, checkpoint_took, checkpoint_growth) = measured(|| {
        let named: Vec<(String, &Tensor)> = state.iter().map(|(n, t)| (n.clone(), t)).collect();
        let file = TensorFile::new(&named, Default::default()).unwrap();
        runtime
            .block_on(store.put_streamed(
                "jobs/bench/checkpoints/stage2.safetensors",
                &mut file.reader(),
            ))
            .unwrap()
    });
    drop(state);

    // A concept's exact delta: every weight changed a little.
    let tuned: Parameters = weights
        .iter()
        .map(|(name, w)| (name.clone(), w + 1e-3))
        .collect();
    let delta = UNetDelta::exact(&weights, &tuned).unwrap();
    let parameters = delta.len();
    drop(tuned);
    drop(weights);
    let delta_tensors: u64 = {
        let (named, _) = delta.layout().unwrap();
        named
            .iter()
            .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    };
    let concept_store = open(&arg("--concept-store").expect("--concept-store URL"));
    let (blob, delta_took, delta_growth) = measured(|| {
        let file = {
            let (named, metadata) = delta.layout().unwrap();
            TensorFile::new(&named, metadata).unwrap()
        };
        runtime
            .block_on(concept_store.put_blob_streamed(move || Ok(Box::new(file.reader()))))
            .unwrap()
    });
    // The sampler's read of it: verified ranges straight into the delta's tensors.
    // Skipped on moto (`--no-read-back`): its ranged GETs copy the whole object each.
    drop(delta);
    let read_back = !std::env::args().any(|a| a == "--no-read-back");
    let (read, read_took, read_growth) = measured(|| {
        read_back.then(|| {
            runtime
                .block_on(UNetDelta::read_blob(&concept_store, &blob))
                .unwrap()
        })
    });
    assert!(read.is_none_or(|read| read.len() == parameters));

    let measured_rate = written.size as f64 / checkpoint_took.as_secs_f64();
    let rate = measured_rate.min(200e6);
    let write = Duration::from_secs_f64(checkpoint_bytes as f64 / rate);
    let policy = CadencePolicy {
        every_steps: 50,
        every_seconds: None,
        max_cost_fraction: DEFAULT_MAX_COST_FRACTION,
    };
    let cadence: Vec<_> = [1000usize, 5000, 20000]
        .iter()
        .map(|&steps| {
            let cost = simulate(
                policy,
                steps,
                Duration::from_millis(500),
                checkpoint_bytes,
                write,
            );
            json!({
                "steps": steps,
                "checkpoints": cost.checkpoints,
                "fraction": cost.fraction,
                "longest_gap_s": cost.longest_gap.as_secs_f64(),
            })
        })
        .collect();
    println!(
        "{}",
        json!({
            "checkpoint": {
                "tensor_bytes": checkpoint_bytes,
                "written_bytes": written.size,
                "seconds": checkpoint_took.as_secs_f64(),
                "bytes_per_second": measured_rate,
                "peak_rss_growth_bytes": checkpoint_growth,
            },
            "concept_delta": {
                "tensor_bytes": delta_tensors,
                "written_bytes": blob.size,
                "seconds": delta_took.as_secs_f64(),
                "peak_rss_growth_bytes": delta_growth,
                "read_seconds": read_back.then_some(read_took.as_secs_f64()),
                "read_peak_rss_growth_bytes": read_back.then_some(read_growth),
            },
            "cadence": {
                "step_seconds": 0.5,
                "store_bytes_per_second": rate,
                "checkpoint_write_seconds": write.as_secs_f64(),
                "stage2": cadence,
            },
        })
    );
}
