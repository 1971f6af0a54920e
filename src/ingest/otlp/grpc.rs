//! OTLP/gRPC: the unary call
//! `opentelemetry.proto.collector.metrics.v1.MetricsService/Export` over
//! HTTP/2 without TLS (the gRPC wire protocol,
//! <https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>):
//! a request body of one length-prefixed message (a compressed flag byte,
//! then its length, 4 bytes big-endian), optionally gzip
//! (`grpc-encoding: gzip`); the answer is one length-prefixed
//! `ExportMetricsServiceResponse` and the trailers `grpc-status: 0`, or,
//! on error, trailers only:
//! - `INVALID_ARGUMENT` for a message that does not decode (not retried);
//! - `RESOURCE_EXHAUSTED` for one over `otlp.max_body`, without
//!   `RetryInfo` (so not retried, as the OTLP spec has it);
//! - `UNAVAILABLE` with a `google.rpc.RetryInfo` in
//!   `grpc-status-details-bin` when the WAL stays full, or tallyd stops
//!   before the record is durable;
//! - `UNIMPLEMENTED` for any other method, or an encoding other than gzip
//!   (with `grpc-accept-encoding: gzip`); `INTERNAL` for a compressed
//!   message without `grpc-encoding: gzip`; HTTP 415 for a request whose
//!   `Content-Type` is not `application/grpc…`.
//!
//! One method and its framing: a few lines over hyper's HTTP/2, where a
//! gRPC framework would bring a second HTTP stack and its tower layers for
//! the same call. The handling itself is [`OtlpIngest::export`]'s, shared
//! with OTLP/HTTP.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{Answer, OtlpIngest};
use crate::aggregate::Scratch;
use crate::auth::Listener;
use crate::auth::tls::Stream;
use crate::protocol::otlp::Encoding;

/// The method's path.
pub const METHOD: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// Requests one connection may have in flight (hyper's default is 200).
const MAX_STREAMS: u32 = 16;

const OK: u32 = 0;
const INVALID_ARGUMENT: u32 = 3;
const RESOURCE_EXHAUSTED: u32 = 8;
const UNIMPLEMENTED: u32 = 12;
const INTERNAL: u32 = 13;
const UNAUTHENTICATED: u32 = 16;
/// Not gRPC codes: a request that is not gRPC (HTTP 415), and one in an
/// encoding tallyd does not take (UNIMPLEMENTED, `grpc-accept-encoding`).
const UNSUPPORTED: u32 = 1000;
const ENCODING: u32 = 1001;
const UNAVAILABLE: u32 = 14;

/// `google.rpc.Status` with its details.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo` (its `retry_delay`, a `google.protobuf.Duration`).
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// A response body: at most one data frame, then the trailers.
pub struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// The message of a request body: `Err` with a status and why.
fn unframe(body: &[u8], gzip_ok: bool) -> Result<(&[u8], bool), (u32, String)> {
    let bad = |m: &str| (INVALID_ARGUMENT, m.to_owned());
    let (&flag, rest) = body.split_first().ok_or_else(|| bad("empty request"))?;
    let len = rest
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("truncated message prefix"))?;
    let message = rest
        .get(4..)
        .filter(|m| m.len() == len)
        .ok_or_else(|| bad("the message length does not match the body"))?;
    match flag {
        0 => Ok((message, false)),
        1 if gzip_ok => Ok((message, true)),
        // The spec's answer to a compressed message in no known encoding.
        1 => Err((
            INTERNAL,
            "a compressed message without grpc-encoding: gzip".into(),
        )),
        _ => Err(bad("unknown compressed-flag")),
    }
}

impl OtlpIngest {
    /// Serves OTLP/gRPC until `stop` turns true.
    pub async fn serve_grpc(self, listener: TcpListener, stop: watch::Receiver<bool>) {
        self.serve(listener, stop, true).await;
    }

    pub(super) async fn grpc_connection(
        self,
        stream: Stream<TcpStream>,
        wal_stream: usize,
        mut stop: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        let scratch = Arc::new(tokio::sync::Mutex::new(Scratch::for_stream(wal_stream)));
        let peer: Arc<str> = stream.peer().into();
        let svc = service_fn(move |req| {
            let (this, scratch, peer) =
                (Arc::clone(&this), Arc::clone(&scratch), Arc::clone(&peer));
            async move { Ok::<_, Infallible>(this.grpc(req, &scratch, &peer).await) }
        });
        // Streams of one connection at once: each may hold a body of up to
        // `otlp.max_body` while it is read.
        let conn = http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(MAX_STREAMS)
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(60)))
            .serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    async fn grpc(
        &self,
        req: Request<Incoming>,
        scratch: &tokio::sync::Mutex<Scratch>,
        peer: &str,
    ) -> Response<GrpcBody> {
        let header = |name| {
            req.headers()
                .get(name)
                .map(|v| v.as_bytes().to_ascii_lowercase())
        };
        let encoding = header("grpc-encoding");
        let gzip_ok = encoding.as_deref() == Some(b"gzip");
        let grpc =
            header(CONTENT_TYPE.as_str()).is_some_and(|t| t.starts_with(b"application/grpc"));
        let answer = if let Some(m) = self.token_refusal(&req, Listener::OtlpGrpc, peer) {
            Err((UNAUTHENTICATED, m))
        } else if !grpc {
            // The spec: HTTP 415 for a request that is not gRPC.
            Err((UNSUPPORTED, "Content-Type must be application/grpc".into()))
        } else if req.uri().path() != METHOD {
            Err((UNIMPLEMENTED, format!("tallyd serves {METHOD} only")))
        } else if encoding
            .as_deref()
            .is_some_and(|e| e != b"gzip" && e != b"identity")
        {
            Err((ENCODING, "grpc-encoding must be gzip or identity".into()))
        } else {
            // The prefix is 5 bytes; the message's limit is otlp.max_body.
            let limit = self.max_body.saturating_add(5);
            match super::read_body(req.into_body(), limit).await {
                Err(e) if e.is::<tokio::time::error::Elapsed>() => Err((
                    INVALID_ARGUMENT,
                    "the request did not arrive in time".into(),
                )),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Err((
                    RESOURCE_EXHAUSTED,
                    format!("the message is over the {} byte limit", self.max_body),
                )),
                Err(e) => Err((INVALID_ARGUMENT, format!("could not read the request: {e}"))),
                Ok(body) => match unframe(&body, gzip_ok) {
                    Err(e) => Err(e),
                    Ok((message, gzip)) => Ok(self
                        .export(message, Encoding::Protobuf, gzip, scratch)
                        .await),
                },
            }
        };
        let answer = match answer {
            Ok(a) => a,
            Err((code, message)) => {
                let status = match code {
                    RESOURCE_EXHAUSTED => hyper::StatusCode::PAYLOAD_TOO_LARGE,
                    UNIMPLEMENTED => hyper::StatusCode::NOT_FOUND,
                    UNSUPPORTED => hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    ENCODING => hyper::StatusCode::NOT_ACCEPTABLE,
                    INTERNAL => hyper::StatusCode::INTERNAL_SERVER_ERROR,
                    UNAUTHENTICATED => hyper::StatusCode::UNAUTHORIZED,
                    _ => hyper::StatusCode::BAD_REQUEST,
                };
                Answer::Refused(status, message)
            }
        };
        self.count(&answer);
        respond(answer)
    }
}

/// The gRPC response of an answer.
fn respond(answer: Answer) -> Response<GrpcBody> {
    let mut trailers = HeaderMap::new();
    let mut http_status = hyper::StatusCode::OK;
    let (data, code, message, retry) = match answer {
        Answer::Ok(r) => {
            let message = r.encode_to_vec();
            let mut framed = Vec::with_capacity(5 + message.len());
            framed.push(0);
            framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
            framed.extend_from_slice(&message);
            (Some(Bytes::from(framed)), OK, String::new(), false)
        }
        Answer::Refused(status, message) => {
            let code = match status {
                hyper::StatusCode::PAYLOAD_TOO_LARGE => RESOURCE_EXHAUSTED,
                hyper::StatusCode::NOT_FOUND
                | hyper::StatusCode::METHOD_NOT_ALLOWED
                | hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE => UNIMPLEMENTED,
                hyper::StatusCode::NOT_ACCEPTABLE => {
                    trailers.insert("grpc-accept-encoding", HeaderValue::from_static("gzip"));
                    UNIMPLEMENTED
                }
                hyper::StatusCode::INTERNAL_SERVER_ERROR => INTERNAL,
                hyper::StatusCode::UNAUTHORIZED => UNAUTHENTICATED,
                _ => INVALID_ARGUMENT,
            };
            if status == hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE {
                http_status = status;
            }
            (None, code, message, false)
        }
        Answer::Unavailable(message) => (None, UNAVAILABLE, message, true),
    };
    trailers.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty()
        && let Ok(v) = HeaderValue::from_str(&percent_encode(&message))
    {
        trailers.insert("grpc-message", v);
    }
    if retry {
        let info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: super::RETRY_AFTER_SECS as i64,
                nanos: 0,
            }),
        };
        let status = RpcStatus {
            code: code as i32,
            message,
            details: vec![Any {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: info.encode_to_vec(),
            }],
        };
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.encode_to_vec());
        if let Ok(v) = HeaderValue::from_str(&b64) {
            trailers.insert("grpc-status-details-bin", v);
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    // Without a message, the trailers go in the headers (trailers-only).
    let body = match data {
        Some(d) => GrpcBody {
            data: Some(d),
            trailers: Some(trailers),
        },
        None => {
            headers.extend(trailers);
            GrpcBody {
                data: None,
                trailers: None,
            }
        }
    };
    let mut r = Response::new(body);
    *r.headers_mut() = headers;
    *r.status_mut() = http_status;
    r
}

/// `grpc-message`'s percent-encoding: printable ASCII but `%` as is.
fn percent_encode(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
