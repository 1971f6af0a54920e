//! OTLP ingest over HTTP (and gRPC, [`grpc`]): `POST /v1/metrics` with an
//! `ExportMetricsServiceRequest` in `application/x-protobuf` or
//! `application/json`, optionally `Content-Encoding: gzip` (the OTLP/HTTP
//! spec, <https://opentelemetry.io/docs/specs/otlp/#otlphttp>).
//!
//! The answers, as the spec has them:
//! - `200` with an `ExportMetricsServiceResponse` once the request's WAL
//!   record is durable under `wal.sync` (as a protobuf batch's `OK`), its
//!   `partial_success` naming the points refused (invalid, outside
//!   `aggregate.timestamp_window`, past the memory budget or tallyd's name
//!   and tag limits) and why;
//! - `400` for a body that does not decode (never retried by clients),
//!   `413` for one over `otlp.max_body` (after decompression too), `415`
//!   for another content type or encoding, `404` / `405` elsewhere; each
//!   with a `google.rpc.Status` in the request's encoding;
//! - `413` too for a request whose converted record would not fit a WAL
//!   segment;
//! - `503` with `Retry-After` when the WAL stays full for
//!   `proto.overload_timeout`, or tallyd stops before the record is
//!   durable: nothing of the request was applied, or it was and a retry
//!   is counted once (see [`crate::ledger::temporality`]).
//!
//! A request is judged, recorded and applied under the series state's
//! lock ([`convert`]), so requests of one series never race.

pub mod convert;
pub mod grpc;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::record::Recorder;
use crate::aggregate::Scratch;
use crate::auth::tls::{Alpn, Stream};
use crate::auth::{self, Guard, Refusal};
use crate::ledger::temporality::Temporality;
use crate::protocol::otlp::{self, BodyError, Encoding};
use crate::telemetry::otlp::Outcome;
use crate::telemetry::{BlockStats, Telemetry};
use crate::wal::AppendError;

/// The OTLP/HTTP path for metrics.
pub const PATH: &str = "/v1/metrics";
const WAL_RETRY: Duration = Duration::from_millis(10);
/// The largest converted request (without a WAL, the memory a request may
/// take while it is converted).
const MAX_RECORD: usize = 256 << 20;
/// Seconds a client is told to wait after a `503`.
const RETRY_AFTER_SECS: u64 = 1;

#[derive(Clone)]
pub struct OtlpIngest {
    pub recorder: Recorder,
    pub telemetry: Arc<Telemetry>,
    pub temporality: Arc<Temporality>,
    /// Most bytes of a request body, compressed or not.
    pub max_body: usize,
    /// Resource attributes promoted to tags.
    pub resource_tags: Arc<[String]>,
    pub max_connections: usize,
    pub overload_timeout: Duration,
    pub idle_timeout: Duration,
    pub wal_streams: std::ops::Range<usize>,
    /// TLS (`tls.listeners` names `otlp_http`, `otlp_grpc`) and the tokens
    /// asked for (`Authorization: Bearer`, each request).
    pub guard: Arc<Guard>,
}

/// `google.rpc.Status`, the body of an OTLP error response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// gRPC status codes (google.rpc.Code) the answers use.
const INVALID_ARGUMENT: i32 = 3;
const UNAUTHENTICATED: i32 = 16;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNIMPLEMENTED: i32 = 12;
const UNAVAILABLE: i32 = 14;

/// What handling a request came to.
#[derive(Debug)]
pub enum Answer {
    /// Durable: the response, with its partial success if any.
    Ok(otlp::Response),
    /// The client's fault (HTTP 400 / 413 / 415 / 404 / 405).
    Refused(StatusCode, String),
    /// Try again later (HTTP 503).
    Unavailable(String),
}

impl OtlpIngest {
    /// Decodes, converts, records and applies one request body, and waits
    /// until its record is durable.
    /// `scratch` is locked only while the request is recorded and applied,
    /// not while it waits for durability (requests of one HTTP/2
    /// connection share it).
    pub async fn export(
        &self,
        body: &[u8],
        encoding: Encoding,
        gzip: bool,
        scratch: &tokio::sync::Mutex<Scratch>,
    ) -> Answer {
        let request = match otlp::decode(body, encoding, gzip, self.max_body) {
            Ok(r) => r,
            Err(BodyError::TooLarge(_)) => {
                let e = BodyError::TooLarge(self.max_body);
                return Answer::Refused(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
            }
            Err(e) => return Answer::Refused(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let deadline = Instant::now() + self.overload_timeout;
        let (converted, ticket, rejected_by_limits, stats) = loop {
            let mut scratch = scratch.lock().await;
            // Conversion, the WAL append and the apply are CPU work under
            // the series state's lock: the other tasks of this worker
            // thread move to another meanwhile.
            let recorded = tokio::task::block_in_place(|| self.record(&request, &mut scratch));
            drop(scratch);
            match recorded {
                Ok(Some(done)) => break done,
                Ok(None) => {
                    let e = "the request, converted, is larger than a WAL record can be; send fewer points per request";
                    return Answer::Refused(StatusCode::PAYLOAD_TOO_LARGE, e.into());
                }
                Err(AppendError::Full) if Instant::now() < deadline => {
                    tokio::time::sleep(WAL_RETRY).await;
                }
                Err(e) => {
                    self.telemetry.wal_refused(e);
                    return match e {
                        AppendError::Full => Answer::Unavailable(
                            "the write-ahead log is full; retry later".into(),
                        ),
                        // Never fits: a retry would fail alike.
                        AppendError::TooLarge => Answer::Refused(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "the request, converted, is larger than a WAL segment; send fewer points per request".into(),
                        ),
                    };
                }
            }
        };
        self.telemetry
            .record_block(&self.telemetry.otlp_blocks, &stats);
        // Points the apply refused for tallyd's limits were counted as
        // applied by the conversion.
        let limits = u64::from(rejected_by_limits);
        let mut outcomes = converted.outcomes;
        let applied = &mut outcomes[Outcome::Applied as usize];
        *applied = applied.saturating_sub(limits);
        outcomes[Outcome::Limits as usize] += limits;
        for (c, n) in self.telemetry.otlp.points.iter().zip(outcomes) {
            c.fetch_add(n, Relaxed);
        }
        if let Some(wal) = &self.recorder.wal
            && !wal.wait_durable(ticket).await
        {
            return Answer::Unavailable("tallyd is stopping; retry".into());
        }
        let rejected = converted.rejected() + limits;
        let mut response = otlp::Response::default();
        if rejected > 0 {
            let message = converted.message.unwrap_or_else(|| {
                "a name or tags over tallyd's limits (statsd.max_name_len, max_tags, max_tag_len)"
                    .into()
            });
            response.partial_success = Some(otlp::ExportMetricsPartialSuccess {
                rejected_data_points: i64::try_from(rejected).unwrap_or(i64::MAX),
                error_message: message,
            });
        }
        Answer::Ok(response)
    }

    /// Judges, records and applies `request` under the series state's
    /// lock: the marks are applied only once the record is in the WAL.
    /// `None` when its record would be larger than the WAL takes.
    #[allow(clippy::type_complexity)]
    fn record(
        &self,
        request: &otlp::Request,
        scratch: &mut Scratch,
    ) -> Result<Option<(convert::Converted, u64, u32, BlockStats)>, AppendError> {
        let generation = self.recorder.aggregator.current();
        let (limits, parse_limits) = self.recorder.aggregator.limits();
        let wal = self.recorder.wal.as_ref();
        let mut guard = self.temporality.lock();
        let used = generation.bytes.load(Relaxed);
        let cx = convert::Context {
            resource_tags: &self.resource_tags,
            budget: limits.max_memory.saturating_sub(used),
            started: generation.started,
            window: limits.timestamp_window,
            interval: limits.interval,
            limits: parse_limits,
            max_bytes: wal.map_or(MAX_RECORD, |w| w.max_payload().min(MAX_RECORD)),
        };
        drop(generation);
        let Some(converted) = convert::convert(request, &mut guard, &cx) else {
            return Ok(None);
        };
        let mut stats = BlockStats::default();
        let record = &converted.record;
        if record.batches.is_empty() && record.marks.is_empty() {
            // Nothing new (retries): answered once what came before is
            // durable, as a protobuf DUPLICATE is, for the original may
            // still be waiting for its sync.
            let ticket = wal.map_or(0, |w| w.ticket());
            return Ok(Some((converted, ticket, 0, stats)));
        }
        let bytes = record.encode_to_vec();
        let (ticket, rejected) =
            self.recorder
                .otlp(&bytes, &record.batches, scratch, &mut stats)?;
        stats.blocks = 1;
        stats.bytes = bytes.len() as u64;
        let (series, series_bytes) = guard.commit();
        self.telemetry.otlp.series.store(series as u64, Relaxed);
        self.telemetry
            .otlp
            .series_bytes
            .store(series_bytes, Relaxed);
        Ok(Some((converted, ticket, rejected, stats)))
    }

    /// Serves OTLP/HTTP until `stop` turns true.
    pub async fn serve_http(self, listener: TcpListener, stop: watch::Receiver<bool>) {
        self.serve(listener, stop, false).await;
    }

    /// Serves OTLP/HTTP, or OTLP/gRPC ([`grpc`]), until `stop` turns true.
    async fn serve(self, listener: TcpListener, stop: watch::Receiver<bool>, grpc: bool) {
        let (max, streams, telemetry) = (
            self.max_connections,
            self.wal_streams.clone(),
            Arc::clone(&self.telemetry),
        );
        let gate = super::Gate {
            listener: match grpc {
                true => auth::Listener::OtlpGrpc,
                false => auth::Listener::OtlpHttp,
            },
            guard: Arc::clone(&self.guard),
            telemetry: Arc::clone(&telemetry),
            alpn: if grpc { Alpn::H2 } else { Alpn::Http1 },
        };
        super::serve_connections(
            listener,
            max,
            streams,
            Some(telemetry),
            Some(gate),
            stop,
            move |stream, wal_stream, stop| {
                let this = self.clone();
                async move {
                    if grpc {
                        this.grpc_connection(stream, wal_stream, stop).await;
                    } else {
                        this.connection(stream, wal_stream, stop).await;
                    }
                }
            },
        )
        .await;
    }

    async fn connection(
        self,
        stream: Stream<TcpStream>,
        wal_stream: usize,
        stop: watch::Receiver<bool>,
    ) {
        let idle = self.idle_timeout;
        let this = Arc::new(self);
        let scratch = Arc::new(tokio::sync::Mutex::new(Scratch::for_stream(wal_stream)));
        let peer: Arc<str> = stream.peer().into();
        let svc = service_fn(move |req| {
            let (this, scratch, peer) =
                (Arc::clone(&this), Arc::clone(&scratch), Arc::clone(&peer));
            async move { Ok::<_, Infallible>(this.http(req, &scratch, &peer).await) }
        });
        // A connection with no request for this long is closed.
        let header_timeout = idle.min(Duration::from_secs(60));
        super::serve_http1(stream, svc, header_timeout, stop).await;
    }

    /// Why a request is refused for its token (`None`: it may go on, or
    /// no token is asked for); counted.
    fn token_refusal(
        &self,
        req: &Request<Incoming>,
        listener: auth::Listener,
        peer: &str,
    ) -> Option<String> {
        let tokens = self.guard.tokens()?;
        let header = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
        let reason = tokens.check_bearer(header).err()?;
        let message = match reason {
            Refusal::TokenWrong => "the bearer token is not one this listener accepts",
            _ => "this listener needs Authorization: Bearer <token> (auth.token_file)",
        };
        self.telemetry
            .refused
            .refuse(listener, reason, peer, message);
        Some(message.to_owned())
    }

    async fn http(
        &self,
        req: Request<Incoming>,
        scratch: &tokio::sync::Mutex<Scratch>,
        peer: &str,
    ) -> Response<Full<Bytes>> {
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                })
        };
        let encoding = match header(CONTENT_TYPE).as_deref() {
            Some("application/json") => Encoding::Json,
            _ => Encoding::Protobuf,
        };
        let answer = if let Some(m) = self.token_refusal(&req, auth::Listener::OtlpHttp, peer) {
            Answer::Refused(StatusCode::UNAUTHORIZED, m)
        } else if req.uri().path() != PATH {
            Answer::Refused(
                StatusCode::NOT_FOUND,
                format!("tallyd takes OTLP metrics at {PATH}"),
            )
        } else if req.method() != Method::POST {
            Answer::Refused(StatusCode::METHOD_NOT_ALLOWED, "use POST".into())
        } else if !matches!(
            header(CONTENT_TYPE).as_deref(),
            Some("application/x-protobuf" | "application/json")
        ) {
            let m = "Content-Type must be application/x-protobuf or application/json";
            Answer::Refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, m.into())
        } else {
            let gzip = match header(CONTENT_ENCODING).as_deref() {
                None | Some("identity") => Ok(false),
                Some("gzip") => Ok(true),
                Some(other) => Err(other.to_owned()),
            };
            match gzip {
                Err(other) => Answer::Refused(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("Content-Encoding {other} is not supported (gzip is)"),
                ),
                Ok(gzip) => match read_body(req.into_body(), self.max_body).await {
                    Err(e) if e.is::<tokio::time::error::Elapsed>() => Answer::Refused(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the body did not arrive within {} s",
                            BODY_TIMEOUT.as_secs()
                        ),
                    ),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => Answer::Refused(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        BodyError::TooLarge(self.max_body).to_string(),
                    ),
                    Err(e) => Answer::Refused(
                        StatusCode::BAD_REQUEST,
                        format!("could not read the body: {e}"),
                    ),
                    Ok(body) => self.export(&body, encoding, gzip, scratch).await,
                },
            }
        };
        self.count(&answer);
        respond(answer, encoding)
    }

    fn count(&self, answer: &Answer) {
        let i = match answer {
            Answer::Ok(r) if r.partial_success.is_some() => 1,
            Answer::Ok(_) => 0,
            Answer::Refused(StatusCode::PAYLOAD_TOO_LARGE, _) => 3,
            Answer::Refused(..) => 2,
            Answer::Unavailable(_) => 4,
        };
        self.telemetry.otlp.requests[i].fetch_add(1, Relaxed);
    }
}

/// How long a request's body may take to arrive once its headers have.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request body of at most `max` bytes, within [`BODY_TIMEOUT`]; the
/// error is a `LengthLimitError`, an `Elapsed` or hyper's.
async fn read_body(
    body: Incoming,
    max: usize,
) -> Result<Bytes, Box<dyn std::error::Error + Send + Sync>> {
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, max).collect()).await {
        Ok(read) => read.map(|b| b.to_bytes()),
        Err(elapsed) => Err(Box::new(elapsed)),
    }
}

/// The HTTP response of an answer, its body in `encoding`.
fn respond(answer: Answer, encoding: Encoding) -> Response<Full<Bytes>> {
    let (status, body) = match answer {
        Answer::Ok(r) => (StatusCode::OK, encode(&r, encoding)),
        Answer::Refused(status, message) => {
            let code = match status {
                StatusCode::PAYLOAD_TOO_LARGE => RESOURCE_EXHAUSTED,
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => UNIMPLEMENTED,
                StatusCode::UNAUTHORIZED => UNAUTHENTICATED,
                _ => INVALID_ARGUMENT,
            };
            (status, status_body(code, message, encoding))
        }
        Answer::Unavailable(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            status_body(UNAVAILABLE, message, encoding),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let ct = match encoding {
        Encoding::Json => "application/json",
        Encoding::Protobuf => "application/x-protobuf",
    };
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    r
}

fn encode(r: &otlp::Response, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => r.encode_to_vec(),
        // A full success is `{}`, as protobuf's JSON mapping writes it.
        Encoding::Json if r.partial_success.is_none() => b"{}".to_vec(),
        Encoding::Json => serde_json::to_vec(r).unwrap_or_default(),
    }
}

fn status_body(code: i32, message: String, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => Status { code, message }.encode_to_vec(),
        Encoding::Json => serde_json::json!({ "code": code, "message": message })
            .to_string()
            .into_bytes(),
    }
}
