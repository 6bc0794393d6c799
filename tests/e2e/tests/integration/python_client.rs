//! The Python client package (`clients/python`, `coreg_client`) against both real
//! services: a `coreg-trainer serve` and a `coreg-sampler serve` child process on
//! loopback share one `file://` store on the tiny model, and the package's pytest
//! suite (`clients/python/tests`) runs with their addresses in
//! `COREG_TRAINER_ADDRESS`/`COREG_SAMPLER_ADDRESS`: it trains a concept from a folder
//! of photos, then generates images of it to files, through the helper API and the
//! `python -m coreg_client` command line; the package's unit tests and the check that
//! its committed stubs match `proto/` run in the same session.
//!
//! Nothing is installed here: `make setup` installs the package (editable) and
//! pytest into `.venv`.

use std::process::Command;

use coreg_test_support::fixture::Fixture;
use coreg_test_support::reference::{python, workspace_root};

use crate::common::{start_sampler, start_trainer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_package_trains_from_a_folder_and_generates_to_files() {
    let fx = Fixture::new();
    let model = fx.path("model");
    let store = fx.store_url();
    let trainer = start_trainer(&model, &store, &fx.path("trainer.log"), &[]);
    let sampler = start_sampler(&model, &store, &fx.path("sampler.log"), &[]);
    trainer.wait_serving().await;
    sampler.wait_serving().await;

    let package = workspace_root().join("clients/python");
    let python = python();
    let installed = Command::new(&python)
        .args(["-c", "import coreg_client, pytest"])
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "{} cannot import coreg_client and pytest (run `make setup`, which installs \
         clients/python into the venv):\n{}",
        python.display(),
        String::from_utf8_lossy(&installed.stderr)
    );

    let output = Command::new(&python)
        .current_dir(&package)
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs"])
        .arg("--basetemp")
        .arg(fx.path("pytest"))
        .arg("tests")
        .env("COREG_TRAINER_ADDRESS", &trainer.address)
        .env("COREG_SAMPLER_ADDRESS", &sampler.address)
        // Missing addresses fail the flow tests instead of skipping them.
        .env("COREG_CLIENT_REQUIRE_SERVICES", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("COREG_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the coreg_client tests failed:\n{stdout}\n{}\ntrainer log:\n{}\nsampler log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        trainer.log_text(),
        sampler.log_text()
    );
    // pytest's report, for `-- --nocapture`.
    println!("{stdout}");
    // The flow ran for real: nothing skipped, the flow tests among those passed.
    assert!(!stdout.contains("SKIPPED"), "{stdout}");
    for test in [
        "test_flow.py::test_train_from_folder_writes_the_concept PASSED",
        "test_flow.py::test_generate_writes_pngs_of_the_requested_size PASSED",
        "test_flow.py::test_the_cli_generates_to_files_and_prints_their_paths PASSED",
        "test_units.py::test_the_committed_stubs_are_current_with_proto PASSED",
    ] {
        assert!(stdout.contains(test), "no `{test}` in:\n{stdout}");
    }
    // The concept is in the store both services share.
    assert!(
        fx.path("store/concepts/pyclient").is_dir(),
        "no concepts/pyclient in the file store"
    );
}
