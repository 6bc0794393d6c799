//! Broken model folders give errors that name the file (and key or tensor), never a
//! panic.

use std::path::Path;
use std::process::Command;

fn init(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("model");
    let out = Command::new(env!("CARGO_BIN_EXE_coreg"))
        .args([
            "model",
            "init",
            "--size",
            "tiny",
            "--out",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inputs = dir.join("inputs.safetensors");
    let ids = tch::Tensor::zeros([1, 77], (tch::Kind::Int64, tch::Device::Cpu));
    let latents = tch::Tensor::zeros([1, 4, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let timesteps = tch::Tensor::from_slice(&[10i64]);
    tch::Tensor::write_safetensors(
        &[
            ("input_ids", &ids),
            ("latents", &latents),
            ("timesteps", &timesteps),
        ],
        &inputs,
    )
    .unwrap();
    model
}

/// Runs `coreg model forward` on the folder and returns its error message.
fn forward_error(dir: &Path, model: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_coreg"))
        .args([
            "model",
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            dir.join("inputs.safetensors").to_str().unwrap(),
            "--out",
            dir.join("out.safetensors").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a broken folder was accepted");
    assert!(
        !stderr.contains("panicked"),
        "panicked instead of reporting: {stderr}"
    );
    assert!(
        !dir.join("out.safetensors").exists(),
        "wrote outputs from a broken folder"
    );
    stderr
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

#[test]
fn missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    std::fs::remove_file(model.join("vae/config.json")).unwrap();
    let err = forward_error(dir.path(), &model);
    assert!(err.contains("vae/config.json"), "{err}");
}

#[test]
fn missing_weights_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    std::fs::remove_file(model.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = forward_error(dir.path(), &model);
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("no weights file"),
        "{err}"
    );
}

#[test]
fn malformed_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    let path = model.join("unet/config.json");
    edit_json(&path, |v| {
        v["block_out_channels"] = serde_json::json!("wide")
    });
    let err = forward_error(dir.path(), &model);
    assert!(
        err.contains("unet/config.json") && err.contains("block_out_channels"),
        "{err}"
    );

    std::fs::write(&path, "{ not json").unwrap();
    let err = forward_error(dir.path(), &model);
    assert!(err.contains("unet/config.json"), "{err}");
}

#[test]
fn unsupported_option_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    edit_json(&model.join("unet/config.json"), |v| {
        v["class_embed_type"] = serde_json::json!("timestep")
    });
    let err = forward_error(dir.path(), &model);
    assert!(err.contains("class_embed_type"), "{err}");
}

#[test]
fn weights_of_the_wrong_shape_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    // The config now implies wider layers than the weights hold.
    edit_json(&model.join("text_encoder/config.json"), |v| {
        v["intermediate_size"] = serde_json::json!(128)
    });
    let err = forward_error(dir.path(), &model);
    assert!(
        err.contains("text_encoder/model.safetensors")
            && err.contains("mlp.fc1.")
            && err.contains("the config implies [128"),
        "{err}"
    );
}

#[test]
fn truncated_weights_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = init(dir.path());
    let path = model.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = forward_error(dir.path(), &model);
    assert!(
        err.contains("text_encoder/model.safetensors")
            && err.contains("not a readable safetensors"),
        "{err}"
    );
}

#[test]
fn missing_model_folder_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path());
    let err = forward_error(dir.path(), &dir.path().join("nowhere"));
    assert!(
        err.contains("nowhere") && err.contains("model folder not found"),
        "{err}"
    );
}
