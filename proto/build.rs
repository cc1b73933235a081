//! Compiles the .proto files into Rust (client and server) and a descriptor set for server
//! reflection. Needs `protoc` (Debian's protobuf-compiler, or PROTOC pointing at one).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["expertmesh/v1/generation.proto", "expertmesh/v1/internal.proto", "expertmesh/v1/expert.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // Our codec blames an undecodable request on the caller (INVALID_ARGUMENT).
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out.join("expertmesh_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
