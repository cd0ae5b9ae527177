//! Generates the backend's gRPC server and client code from `schema/proto/` and the
//! descriptor set that server reflection serves. The protos are compiled by protox, a
//! protobuf compiler in Rust, so building needs nothing but cargo (no `protoc`).

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=schema/proto");
    let files = protox::compile(["backend.proto"], ["schema/proto"])?;
    std::fs::write(out.join("backend_descriptor.bin"), files.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(files)?;
    Ok(())
}
