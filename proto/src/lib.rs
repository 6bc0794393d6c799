//! The `coreg.v1` contracts (`proto/coreg/v1/*.proto`) as Rust: messages, the
//! `TrainerService` and `SamplerService` clients and servers, and the descriptor set
//! for server reflection. Python and Go stubs are generated from the same files.

/// Package `coreg.v1`.
pub mod v1 {
    tonic::include_proto!("coreg.v1");
}

/// The encoded `FileDescriptorSet` of every `coreg.v1` file, for
/// `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("coreg_v1_descriptor");
