//! The sampler: images of a learned concept in any scene, with CoRe's test-time
//! optimization per prompt on request. [`personalized`] renders a request on the
//! loaded base model; [`cache`] keeps recently used concepts; [`service`] is the gRPC
//! `SamplerService` around them.

pub mod cache;
pub mod personalized;
pub mod service;
