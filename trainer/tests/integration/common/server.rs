//! This crate's `coreg-trainer serve` as [`Server::start`] and its client as
//! [`Server::client`]; the job helpers are `coreg_test_support::trainer`'s.

use std::path::Path;

use coreg_proto::v1::trainer_service_client::TrainerServiceClient;
use coreg_test_support::process::Server;
use coreg_test_support::trainer;
use tonic::transport::Channel;

/// `coreg-trainer serve` for the tests on a [`Server`].
pub trait TrainerServer {
    /// `coreg-trainer serve` (the binary cargo built for these tests) with the tiny
    /// model in `model`, the store at `store` and `extra` settings; it polls for jobs
    /// every 200 ms.
    fn start(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server;

    async fn client(&self) -> TrainerServiceClient<Channel>;
}

impl TrainerServer for Server {
    fn start(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
        trainer::serve(
            env!("CARGO_BIN_EXE_coreg-trainer"),
            model,
            store,
            log,
            extra,
        )
    }

    async fn client(&self) -> TrainerServiceClient<Channel> {
        trainer::client(self).await
    }
}
