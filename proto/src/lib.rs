//! The cluster's protobuf API and its generated tonic code: the public `Generation` service
//! (served by the router), the internal `Prefill` and `Decode` services, and the `Expert`
//! service of expert workers. Only the `grpc` module of each service touches these types.

pub mod codec;

/// Generated code, nested as the protobuf packages are (cross-package paths rely on it).
pub mod expertmesh {
    pub mod v1 {
        tonic::include_proto!("expertmesh.v1");
    }
    pub mod internal {
        pub mod v1 {
            tonic::include_proto!("expertmesh.internal.v1");
        }
    }
    pub mod expert {
        pub mod v1 {
            tonic::include_proto!("expertmesh.expert.v1");
        }
    }
}

/// Attention-worker-to-expert-worker service (`expertmesh.expert.v1`).
pub use expertmesh::expert::v1 as expert;
/// Router-to-worker and worker-to-worker services (`expertmesh.internal.v1`).
pub use expertmesh::internal::v1 as internal;
/// Public API (`expertmesh.v1`).
pub use expertmesh::v1;

/// Encoded `FileDescriptorSet` of every service here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("expertmesh_descriptor");
