//! Generates the protobuf types from proto/tallyd.proto with prost. protox
//! parses the schema in Rust, so no system `protoc` is needed.

fn main() {
    println!("cargo:rerun-if-changed=proto/tallyd.proto");
    let descriptors =
        protox::compile(["proto/tallyd.proto"], ["proto"]).expect("proto/tallyd.proto compiles");
    prost_build::Config::new()
        .compile_fds(descriptors)
        .expect("prost generates code for proto/tallyd.proto");
}
