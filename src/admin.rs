//! The admin endpoint: `GET /health` (200 once ready, 503 before and while
//! stopping) and `GET /metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::aggregate::Aggregator;
use crate::ingest::udp;
use crate::telemetry::Telemetry;

pub struct AdminState {
    pub telemetry: Arc<Telemetry>,
    pub aggregator: Arc<Aggregator>,
    pub ready: AtomicBool,
    /// Inodes of the UDP sockets, for the kernel's drop counter.
    pub udp_inodes: Vec<u64>,
}

impl AdminState {
    /// `/metrics`: the counters plus values read at scrape time.
    pub fn metrics(&self) -> String {
        let t = &self.telemetry;
        let current = self.aggregator.current();
        t.live_keys.store(current.keys() as u64, Relaxed);
        t.pending_samples
            .store(current.pending.load(Relaxed), Relaxed);
        drop(current);
        if let Some(drops) = udp::kernel_drops(&self.udp_inodes) {
            t.udp_kernel_drops.store(drops, Relaxed);
        }
        t.render()
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, body) = match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") if self.ready.load(Relaxed) => {
                (StatusCode::OK, "ok\n".to_owned())
            }
            (&Method::GET, "/health") => {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
            }
            (&Method::GET, "/metrics") => (StatusCode::OK, self.metrics()),
            (&Method::GET, _) => (
                StatusCode::NOT_FOUND,
                "not found: try /health or /metrics\n".to_owned(),
            ),
            _ => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_owned()),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        resp
    }
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = state.respond(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection failed");
            }
        });
    }
}
