//! Generates the backend's gRPC server and client code from `schema/proto/` and the
//! descriptor set that server reflection serves. Needs `protoc` (Debian:
//! `protobuf-compiler`, which `.ci/run` installs), as poem-grpc's own build does.

fn main() -> std::io::Result<()> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=schema/proto");
    poem_grpc_build::Config::new()
        .file_descriptor_set_path(out.join("backend_descriptor.bin"))
        .compile(&["schema/proto/backend.proto"], &["schema/proto"])?;
    // A reflection client for the black-box tests (what grpcurl uses).
    println!("cargo:rerun-if-changed=tests/proto");
    poem_grpc_build::Config::new()
        .build_server(false)
        .compile(&["tests/proto/reflection.proto"], &["tests/proto"])
}
