//! `coreg-sampler serve` for the tests: the process and its gRPC client.
//!
//! Exists so that the sampler's own tests (with the binary cargo built for them) and
//! the end-to-end tests (with [`crate::binaries::sampler`]) start the sampler the
//! same way.

use std::path::Path;

use coreg_proto::v1 as pb;
use pb::sampler_service_client::SamplerServiceClient;
use tonic::transport::Channel;

use crate::process::Server;

/// `binary serve` (a `coreg-sampler`) on the model in `model` and the store at
/// `store`, with `extra` settings.
pub fn serve(
    binary: impl AsRef<Path>,
    model: &Path,
    store: &str,
    log: &Path,
    extra: &[(&str, &str)],
) -> Server {
    Server::spawn(binary.as_ref(), model, store, log, extra)
}

/// A client that takes responses of up to 64 MiB (a batch of PNGs).
pub async fn client(server: &Server) -> SamplerServiceClient<Channel> {
    SamplerServiceClient::connect(server.url())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}
