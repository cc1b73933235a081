//! The codec of every generated service: prost's, except for whom an undecodable message is
//! blamed on. A server that cannot decode a request (not protobuf, invalid UTF-8 in a string
//! field) answers INVALID_ARGUMENT with the decode error, since the caller sent it; a client
//! that cannot decode a reply keeps INTERNAL (gRPC's guide for parse failures), since the
//! server sent it. `tonic_prost::ProstCodec` says INTERNAL on both ends.

use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::ProstEncoder;

/// Encodes `T` and decodes `U` with prost; `build.rs` names it as the services' codec.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

/// Whose fault a message that does not decode is: every message that crosses the wire as a
/// request or a reply says so here (a service with a new message type does not compile
/// until it does).
pub trait Blame {
    fn undecodable(error: prost::DecodeError) -> Status;
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Blame + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(PhantomData)
    }
}

/// Decodes `U`, blaming failures as `U` says.
#[derive(Debug, Clone)]
pub struct Decoder<U>(PhantomData<U>);

impl<U: Message + Default + Blame> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(U::undecodable)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

macro_rules! blame {
    ($status:ident, $what:literal: $($ty:ty),+ $(,)?) => {
        $(impl Blame for $ty {
            fn undecodable(error: prost::DecodeError) -> Status {
                Status::$status(format!(concat!("the ", $what, " could not be decoded: {}"), error))
            }
        })+
    };
}

use crate::{expert, internal, v1};

blame!(invalid_argument, "request":
    v1::GenerateRequest, v1::TokenizeRequest, v1::ModelInfoRequest,
    internal::PrefillRequest, internal::AdmitRequest, internal::KvChunk, internal::ReleaseRequest,
    internal::LoadRequest,
    expert::ExpertRequest, expert::SlotsRequest, expert::ExpertLoadRequest,
);
blame!(internal, "reply":
    v1::GenerateResponse, v1::GenerateUnaryResponse, v1::TokenizeResponse, v1::ModelInfo,
    internal::PrefillReply, internal::DecodeEvent, internal::PushKvReply, internal::ReleaseReply,
    internal::WorkerLoad,
    expert::ExpertReply, expert::Slots, expert::ExpertLoad,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_blame_the_caller_and_replies_the_server() {
        // GenerateRequest.text (field 1) holding bytes that are not UTF-8.
        let bad_utf8 = [0x0a, 0x02, 0xc3, 0x28];
        let e = v1::GenerateRequest::decode(&bad_utf8[..]).expect_err("invalid UTF-8");
        let s = v1::GenerateRequest::undecodable(e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("the request could not be decoded: failed to decode"), "{}", s.message());
        assert!(s.message().contains("UTF-8"), "{}", s.message());
        let e = v1::GenerateResponse::decode(&[0xff, 0xff, 0xff][..]).expect_err("not protobuf");
        assert_eq!(v1::GenerateResponse::undecodable(e).code(), tonic::Code::Internal);
    }
}
