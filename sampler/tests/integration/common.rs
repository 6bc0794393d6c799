//! This crate's `coreg-sampler serve` as [`Server::start`] and its client as
//! [`Server::client`]. The fixtures (the tiny model, the store, the fake concepts) are
//! `coreg_test_support`'s.

use std::path::Path;

use coreg_proto::v1::sampler_service_client::SamplerServiceClient;
use coreg_test_support::process::Server;
use coreg_test_support::sampler;
use tonic::transport::Channel;

/// `coreg-sampler serve` for the tests on a [`Server`].
pub trait SamplerServer {
    /// `coreg-sampler serve` (the binary cargo built for these tests) on the model in
    /// `model` and the store at `store`, with `extra` settings.
    fn start(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server;

    async fn client(&self) -> SamplerServiceClient<Channel>;
}

impl SamplerServer for Server {
    fn start(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
        sampler::serve(
            env!("CARGO_BIN_EXE_coreg-sampler"),
            model,
            store,
            log,
            extra,
        )
    }

    async fn client(&self) -> SamplerServiceClient<Channel> {
        sampler::client(self).await
    }
}
