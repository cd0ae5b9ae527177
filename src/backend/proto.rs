//! Code generated from `schema/proto/backend.proto` at build time (see `build.rs`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

poem_grpc::include_proto!("milepost.backend.v1");

/// The encoded descriptor set that server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    poem_grpc::include_file_descriptor_set!("backend_descriptor.bin");
