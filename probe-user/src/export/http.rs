//! The HTTP endpoints: `GET /metrics` (Prometheus text format), `/healthz`, `/diagnose`,
//! `/destinations` (the view `connprobe top` reads).
//!
//! hyper 1 (HTTP/1.1 only) on the agent's tokio runtime: a maintained parser is safer than a
//! hand-written one on a port other programs can reach, and it gives header size limits and
//! a header read timeout. On top of that: at most [`MAX_CONNECTIONS`] connections at once, and
//! each connection lives at most [`MAX_CONNECTION_AGE`]. When every slot is taken, a new
//! connection takes the slot of the connection that has been quiet longest (one that never
//! sent a request, or sits idle between requests); only when every connection is in the middle
//! of a request is the new one closed. So a thousand idle or slow (slowloris) connections
//! cannot lock a scraper out. With `--web-config-file` ([`super::web_config`]), connections
//! are TLS (the handshake within [`HEADER_READ_TIMEOUT`]) and requests need basic auth.
//! `/metrics` is encoded on request, on a blocking thread, by the function it is given (the
//! Prometheus exporter, which copies a snapshot of the aggregator under its lock).
use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Notify, watch},
};

use super::web_config::WebSecurity;
use crate::units::parse_duration;

/// `Content-Type` of `/metrics`: the Prometheus text exposition format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections served at once; further ones are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send a request's headers within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Request headers larger than this are answered 431.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// A kept-alive connection is closed after this long (scrapers reconnect).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// In-flight requests get this long to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Answers `/diagnose?window=DURATION`: an HTTP status and a body (JSON if it starts with `{`
/// or `[`, else plain text). Runs on a blocking thread.
pub type DiagnoseFn = dyn Fn(Option<Duration>) -> (u16, String) + Send + Sync;

/// Answers `/metrics`: the text exposition format. Runs on a blocking thread.
pub type MetricsFn = dyn Fn() -> String + Send + Sync;

/// Answers `/destinations?QUERY` (given the query string as sent): an HTTP status and a JSON
/// body (`export::view`). Runs on a blocking thread.
pub type DestinationsFn = dyn Fn(Option<String>) -> (u16, String) + Send + Sync;

/// What the endpoints serve.
pub struct HttpState {
    pub metrics: Arc<MetricsFn>,
    /// `/healthz` answers 200 once this is true (the programs are attached and events flow),
    /// 503 before.
    pub ready: AtomicBool,
    /// `/diagnose`; 404 when `None`.
    pub diagnose: Option<Arc<DiagnoseFn>>,
    /// `/destinations` (`connprobe top`'s view); 404 when `None`.
    pub destinations: Option<Arc<DestinationsFn>>,
    /// TLS, basic auth and extra headers (`--web-config-file`); none by default. Replaced
    /// whole on a reload; a connection keeps the one it was accepted with.
    web: RwLock<Arc<WebSecurity>>,
}

impl HttpState {
    /// Not ready yet; see [`HttpState::set_ready`].
    pub fn new(metrics: Arc<MetricsFn>, diagnose: Option<Arc<DiagnoseFn>>) -> Self {
        HttpState {
            metrics,
            ready: AtomicBool::new(false),
            diagnose,
            destinations: None,
            web: RwLock::new(Arc::default()),
        }
    }

    /// Serves `/destinations` with `destinations`.
    pub fn with_destinations(mut self, destinations: Arc<DestinationsFn>) -> Self {
        self.destinations = Some(destinations);
        self
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// TLS and basic auth for the connections accepted from now on.
    pub fn set_web_security(&self, web: WebSecurity) {
        *self.web.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(web);
    }

    fn web_security(&self) -> Arc<WebSecurity> {
        Arc::clone(&self.web.read().unwrap_or_else(|e| e.into_inner()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {reason} ({hint})")]
    Bind {
        addr: SocketAddr,
        reason: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Binds the metrics address, with an error that says what to do about it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| bind_error(addr, source))
}

fn bind_error(addr: SocketAddr, source: io::Error) -> HttpError {
    let (reason, hint) = match source.kind() {
        io::ErrorKind::AddrInUse => (
            "address already in use".to_string(),
            "another connprobe? pick another --metrics-addr, or --no-metrics",
        ),
        io::ErrorKind::PermissionDenied => (
            "permission denied".to_string(),
            "ports below 1024 need CAP_NET_BIND_SERVICE; pick another --metrics-addr",
        ),
        io::ErrorKind::AddrNotAvailable => (
            "no interface has this address".to_string(),
            "pick an address of this host for --metrics-addr",
        ),
        _ => (
            source.to_string(),
            "pick another --metrics-addr, or --no-metrics",
        ),
    };
    HttpError::Bind {
        addr,
        reason,
        hint,
        source,
    }
}

/// The connections being served, so that a new one can take the slot of the quietest.
struct Connections {
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
    next_id: AtomicU64,
    /// When serving started: activity times are milliseconds since then.
    epoch: Instant,
}

/// One connection's state, as its slot sees it.
struct Tracked {
    /// A request is being answered.
    busy: AtomicBool,
    /// When it was accepted or last began or finished a request (ms since `epoch`).
    last_active: AtomicU64,
    /// Notified to close it.
    close: Notify,
}

impl Connections {
    fn new() -> Self {
        Connections {
            open: Mutex::new(HashMap::with_capacity(MAX_CONNECTIONS)),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A slot for a new connection: a free one, or the one of the connection quiet longest
    /// (which is closed); `None` when every connection is answering a request.
    fn admit(&self) -> Option<(u64, Arc<Tracked>)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= MAX_CONNECTIONS {
            let quietest = open
                .iter()
                .filter(|(_, c)| !c.busy.load(Ordering::Acquire))
                .min_by_key(|(id, c)| (c.last_active.load(Ordering::Acquire), **id))
                .map(|(id, _)| *id)?;
            if let Some(victim) = open.remove(&quietest) {
                victim.close.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            busy: AtomicBool::new(false),
            last_active: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        open.insert(id, Arc::clone(&tracked));
        Some((id, tracked))
    }

    fn release(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn mark(&self, tracked: &Tracked, busy: bool) {
        tracked.last_active.store(self.now_ms(), Ordering::Release);
        tracked.busy.store(busy, Ordering::Release);
    }
}

/// Serves until `shutdown` turns true (or its sender is dropped), then gives in-flight
/// requests [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Connections::new());
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        };
        let Some((id, tracked)) = connections.admit() else {
            tracing::debug!("metrics endpoint: every connection is busy, closing one from {peer}");
            continue;
        };
        let web = state.web_security();
        let service = {
            let (state, web, connections, tracked) = (
                Arc::clone(&state),
                Arc::clone(&web),
                Arc::clone(&connections),
                Arc::clone(&tracked),
            );
            service_fn(move |request| {
                let (state, web, connections, tracked) = (
                    Arc::clone(&state),
                    Arc::clone(&web),
                    Arc::clone(&connections),
                    Arc::clone(&tracked),
                );
                async move {
                    connections.mark(&tracked, true);
                    let response = authorized(&state, &web, request).await;
                    connections.mark(&tracked, false);
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let watcher = graceful.watcher();
        let connections = Arc::clone(&connections);
        tokio::spawn(async move {
            let served = async {
                match &web.tls {
                    Some(tls) => {
                        match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                            Ok(Ok(stream)) => serve_connection(stream, service, watcher).await,
                            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                            Err(_) => Err("no TLS handshake in time".to_string()),
                        }
                    }
                    None => serve_connection(stream, service, watcher).await,
                }
            };
            // Past its age the connection is dropped: a scraper just reconnects.
            tokio::select! {
                result = tokio::time::timeout(MAX_CONNECTION_AGE, served) => {
                    if let Ok(Err(e)) = result {
                        tracing::debug!("metrics endpoint: connection from {peer}: {e}");
                    }
                }
                _ = tracked.close.notified() => {
                    tracing::debug!("metrics endpoint: closed the quiet connection from {peer} to make room");
                }
            }
            connections.release(id);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("metrics endpoint: connections still open at shutdown were dropped");
    }
}

/// HTTP/1.1 on one connection, plain or TLS.
async fn serve_connection<I, S>(io: I, service: S, watcher: Watcher) -> Result<(), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), service);
    watcher.watch(conn).await.map_err(|e| e.to_string())
}

/// Basic auth where the web config asks for it, then the endpoint; the config's headers on
/// every answer.
async fn authorized(
    state: &HttpState,
    web: &WebSecurity,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let allowed = match &web.auth {
        Some(auth) => auth.allows(request.headers().get(AUTHORIZATION)).await,
        None => true,
    };
    let mut response = if allowed {
        respond(state, request).await
    } else {
        let mut response = reply(StatusCode::UNAUTHORIZED, TEXT, "Unauthorized\n");
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"connprobe\""),
        );
        response
    };
    for (name, value) in &web.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

async fn respond(state: &HttpState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD are served\n",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            // Encoding 500 destinations takes milliseconds: keep it off the runtime's workers,
            // which also run the ring buffer reader.
            let metrics = Arc::clone(&state.metrics);
            match tokio::task::spawn_blocking(move || metrics()).await {
                Ok(text) => reply(StatusCode::OK, METRICS_CONTENT_TYPE, text),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding the metrics failed: {e}\n"),
                ),
            }
        }
        "/healthz" => {
            if state.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, TEXT, "ok\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "starting\n")
            }
        }
        "/diagnose" => {
            let Some(diagnose) = state.diagnose.clone() else {
                return reply(StatusCode::NOT_FOUND, TEXT, "diagnose is not enabled\n");
            };
            let window = match window_param(request.uri().query()) {
                Ok(window) => window,
                Err(message) => return reply(StatusCode::BAD_REQUEST, TEXT, message + "\n"),
            };
            match tokio::task::spawn_blocking(move || diagnose(window)).await {
                Ok((status, body)) => {
                    let status =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    let trimmed = body.trim_start();
                    let kind = if trimmed.starts_with('{') || trimmed.starts_with('[') {
                        JSON
                    } else {
                        TEXT
                    };
                    reply(status, kind, body)
                }
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("diagnose failed: {e}\n"),
                ),
            }
        }
        "/destinations" => {
            let Some(destinations) = state.destinations.clone() else {
                return reply(StatusCode::NOT_FOUND, TEXT, "destinations are not served\n");
            };
            let query = request.uri().query().map(str::to_string);
            match tokio::task::spawn_blocking(move || destinations(query)).await {
                Ok((status, body)) => reply(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    JSON,
                    body,
                ),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("destinations failed: {e}\n"),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz, /diagnose or /destinations\n",
        ),
    }
}

/// `window=DURATION` from a query string (`5m`, `90`, `1h%2030m`); `None` when absent.
fn window_param(query: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "window" {
            let value = percent_decode(value).ok_or_else(|| format!("bad window {value:?}"))?;
            return parse_duration(&value)
                .map(Some)
                .map_err(|e| format!("bad window: {e}"));
        }
    }
    Ok(None)
}

pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(
        state: HttpState,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(state), rx));
        (addr, tx, task)
    }

    /// One request on its own connection; returns the status line, headers and body.
    async fn get(addr: SocketAddr, request_line: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("{request_line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    fn state(diagnose: Option<Arc<DiagnoseFn>>) -> HttpState {
        let metrics: Arc<MetricsFn> =
            Arc::new(|| "connprobe_events_lost_total{stage=\"ringbuf\"} 0\n".to_string());
        HttpState::new(metrics, diagnose)
    }

    #[tokio::test]
    async fn endpoints() {
        let diagnose: Arc<DiagnoseFn> = Arc::new(|window: Option<Duration>| match window {
            Some(w) => (200, format!("{{\"window_s\":{}}}", w.as_secs())),
            None => (200, "no window".to_string()),
        });
        let (addr, shutdown, task) = start(state(Some(diagnose))).await;

        let (status, head, body) = get(addr, "GET /metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(body.contains("connprobe_events_lost_total{stage=\"ringbuf\"} 0"));

        assert_eq!(get(addr, "GET /healthz").await.0, 503);
        assert_eq!(get(addr, "GET /nope").await.0, 404);
        assert_eq!(get(addr, "POST /metrics").await.0, 405);

        let (status, head, body) = get(addr, "GET /diagnose?window=1h%2030m").await;
        assert_eq!((status, body.as_str()), (200, "{\"window_s\":5400}"));
        assert!(head.contains("content-type: application/json"), "{head}");
        let (status, _, body) = get(addr, "GET /diagnose?x=1&window=5m").await;
        assert_eq!((status, body.as_str()), (200, "{\"window_s\":300}"));
        let (status, _, body) = get(addr, "GET /diagnose").await;
        assert_eq!((status, body.as_str()), (200, "no window"));
        assert_eq!(get(addr, "GET /diagnose?window=soon").await.0, 400);

        shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve stops on shutdown")
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn healthz_follows_readiness_and_diagnose_may_be_absent() {
        let state = Arc::new(state(None));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&state), rx));
        assert_eq!(get(addr, "GET /healthz").await.0, 503);
        state.set_ready(true);
        let (status, _, body) = get(addr, "GET /healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert_eq!(get(addr, "GET /diagnose?window=5m").await.0, 404);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve stops when the shutdown sender is gone")
            .unwrap();
    }

    #[tokio::test]
    async fn destinations_get_the_query_as_sent() {
        let destinations: Arc<DestinationsFn> = Arc::new(|query: Option<String>| match query {
            Some(q) => (200, format!("{{\"query\":{q:?}}}")),
            None => (400, "{}".to_string()),
        });
        let (addr, _shutdown, _task) = start(state(None).with_destinations(destinations)).await;
        let (status, head, body) = get(addr, "GET /destinations?window=5m&destination=a%3A1").await;
        assert_eq!(status, 200);
        assert_eq!(body, "{\"query\":\"window=5m&destination=a%3A1\"}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert_eq!(get(addr, "GET /destinations").await.0, 400);
        let (addr, _shutdown, _task) = start(state(None)).await;
        assert_eq!(get(addr, "GET /destinations").await.0, 404);
    }

    #[tokio::test]
    async fn oversized_and_silent_requests_are_cut_off() {
        let (addr, _shutdown, _task) = start(state(None)).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        // The server may close while we are still writing.
        let _ = stream.write_all(huge.as_bytes()).await;
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response);
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 431"),
            "{response}"
        );
        // Still serving.
        assert_eq!(get(addr, "GET /metrics").await.0, 200);
    }

    #[tokio::test]
    async fn idle_and_slow_connections_cannot_lock_out_a_scraper() {
        let (addr, _shutdown, _task) = start(state(None)).await;
        // Twice the slots in connections that send nothing, and some that send a header byte
        // now and then.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS * 2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for stream in idle.iter_mut().take(10) {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..20 {
            let started = Instant::now();
            let (status, _, _) =
                tokio::time::timeout(Duration::from_secs(2), get(addr, "GET /metrics"))
                    .await
                    .expect("a scrape gets through");
            assert_eq!(status, 200);
            assert!(started.elapsed() < Duration::from_millis(500));
        }
    }

    #[tokio::test]
    async fn a_request_body_is_never_read() {
        let (addr, _shutdown, _task) = start(state(None)).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
            .await
            .unwrap();
        // A few megabytes of the promised gigabyte: the answer comes without them being read.
        let chunk = vec![b'a'; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for _ in 0..16 {
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        })
        .await;
        let mut head = [0u8; 12];
        let answered =
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head)).await;
        assert!(matches!(answered, Ok(Ok(_))), "{answered:?}");
        assert_eq!(&head, b"HTTP/1.1 405");
        assert_eq!(get(addr, "GET /healthz").await.0, 503);
    }

    #[test]
    fn the_quietest_idle_connection_makes_room() {
        let connections = Connections::new();
        let mut admitted = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            admitted.push(connections.admit().unwrap());
        }
        // The quietest is busy: the next quietest goes.
        for (_, tracked) in &admitted {
            tracked.last_active.store(1000, Ordering::Release);
        }
        connections.mark(&admitted[0].1, true);
        admitted[0].1.last_active.store(0, Ordering::Release);
        admitted[5].1.last_active.store(1, Ordering::Release);
        let (_, newest) = connections.admit().unwrap();
        assert!(
            !connections
                .open
                .lock()
                .unwrap()
                .contains_key(&admitted[5].0)
        );
        assert!(
            connections
                .open
                .lock()
                .unwrap()
                .contains_key(&admitted[0].0)
        );
        assert_eq!(connections.open.lock().unwrap().len(), MAX_CONNECTIONS);
        // When every one is busy, there is no room.
        for (_, tracked) in &admitted {
            connections.mark(tracked, true);
        }
        connections.mark(&newest, true);
        assert!(connections.admit().is_none());
    }

    #[tokio::test]
    async fn bind_errors_say_what_to_do() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "cannot listen on {addr}: address already in use (another connprobe? pick \
                 another --metrics-addr, or --no-metrics)"
            )
        );
    }

    #[test]
    fn query_parsing() {
        assert_eq!(window_param(None), Ok(None));
        assert_eq!(window_param(Some("a=b")), Ok(None));
        assert_eq!(
            window_param(Some("window=90")),
            Ok(Some(Duration::from_secs(90)))
        );
        assert_eq!(
            window_param(Some("window=1h+30m")),
            Ok(Some(Duration::from_secs(5400)))
        );
        assert!(window_param(Some("window=%zz")).is_err());
        assert!(window_param(Some("window=")).is_err());
        let five = Ok(Some(Duration::from_secs(300)));
        assert_eq!(window_param(Some("window=300s")), five);
        assert_eq!(window_param(Some("a=b&window=5m")), five);
        assert_eq!(window_param(Some("window=300")), five);
        assert!(window_param(Some("window=soon")).is_err());
        assert_eq!(window_param(Some("x=1")), Ok(None));
    }
}
