//! What the workspace's test crates share: one module per fixture, each written once.
//!
//! A dev-dependency of `coreg`, `coreg-trainer`, `coreg-sampler` and `coreg-e2e`, used
//! by their integration tests (and the trainer's job store unit tests, which need only
//! [`moto`]). `coreg`'s own `#[cfg(test)]` unit tests must not use the `coreg`-typed
//! fixtures ([`concept`], [`fixture`]): through this crate they would get a second copy
//! of `coreg`, whose types are distinct from the crate under test.
//!
//! - [`reference`](mod@reference): the workspace root, the Python reference
//!   interpreter and modules, safetensors files, and the tolerance measure of the
//!   parity tests.
//! - [`moto`]: a real S3 API (`moto_server`) on loopback.
//! - [`faults`]: store faults (latency, throttling, resets, partitions) from a real
//!   fault-injecting proxy in front of it.
//! - [`binaries`]: a workspace binary (`coreg-trainer`, `coreg-sampler`) from any test
//!   crate, built first if needed.
//! - [`process`]: a service child process (`… serve`) on loopback: started, probed,
//!   scraped, signalled.
//! - [`trainer`], [`sampler`]: the two services' processes and gRPC clients.
//! - [`model`]: the tiny random model folder.
//! - [`photos`]: training photos and PNG bytes, good and hostile.
//! - [`concept`]: a fake concept, as the trainer would store one.
//! - [`fixture`]: a temporary directory with the tiny model, a `file://` store and,
//!   as asked, photos and concepts.

pub mod binaries;
pub mod concept;
pub mod faults;
pub mod fixture;
pub mod model;
pub mod moto;
pub mod photos;
pub mod process;
pub mod reference;
pub mod sampler;
pub mod trainer;
