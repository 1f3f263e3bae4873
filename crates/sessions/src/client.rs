//! [`SessionsClient`]: the sessions service over HTTP, as a
//! [`SessionBackend`] — so the same code (and the same conformance scenario)
//! drives a local backend, a cluster, or the service. A transport failure
//! while a command runs is [`SessionError::ConnectionLost`]: the command's
//! fate is unknown, never guessed.

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::StreamExt as _;
use sandfleet_sandbox::session::{
    CommandOutput, FileContents, OutputChunk, RunOptions, SessionBackend, SessionError, SessionId,
    SessionSpec,
};
use tokio::sync::mpsc;

use crate::wire::{RunRequest, SessionInfo, StreamLine, TRUNCATED_HEADER};

/// A client of the sessions service.
#[derive(Debug, Clone)]
pub struct SessionsClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl SessionsClient {
    /// A client of the service at `base` (`http://host:port`) with `token`.
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> SessionsClient {
        SessionsClient {
            base: base.into().trim_end_matches('/').to_owned(),
            token: token.into(),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Starts a session and returns what the service says about it.
    pub async fn create(&self, spec: &SessionSpec) -> Result<SessionInfo, SessionError> {
        let resp = self
            .req(reqwest::Method::POST, "/v1/sessions")
            .json(spec)
            .send()
            .await
            .map_err(unavailable)?;
        ok(resp, "").await?.json().await.map_err(unavailable)
    }

    /// Creates a session from warm pool `pool` (a cold start when the pool
    /// has no idle member); the pool decides image and resources.
    pub async fn create_in_pool(
        &self,
        spec: &SessionSpec,
        pool: &str,
    ) -> Result<SessionInfo, SessionError> {
        let mut body = serde_json::to_value(spec)
            .map_err(|e| SessionError::InvalidSpec(format!("session spec: {e}")))?;
        if let Some(o) = body.as_object_mut() {
            o.insert("pool".into(), serde_json::Value::String(pool.to_owned()));
        }
        let resp = self
            .req(reqwest::Method::POST, "/v1/sessions")
            .json(&body)
            .send()
            .await
            .map_err(unavailable)?;
        ok(resp, "").await?.json().await.map_err(unavailable)
    }

    /// The warm pools and their counts.
    pub async fn pools(&self) -> Result<Vec<crate::pool::PoolInfo>, SessionError> {
        let resp = self
            .req(reqwest::Method::GET, "/v1/pools")
            .send()
            .await
            .map_err(unavailable)?;
        ok(resp, "").await?.json().await.map_err(unavailable)
    }

    /// This token's sessions.
    pub async fn list(&self) -> Result<Vec<SessionInfo>, SessionError> {
        let resp = self
            .req(reqwest::Method::GET, "/v1/sessions")
            .send()
            .await
            .map_err(unavailable)?;
        ok(resp, "").await?.json().await.map_err(unavailable)
    }

    /// One session.
    pub async fn info(&self, id: &SessionId) -> Result<SessionInfo, SessionError> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/v1/sessions/{id}"))
            .send()
            .await
            .map_err(unavailable)?;
        ok(resp, "").await?.json().await.map_err(unavailable)
    }
}

fn unavailable(e: reqwest::Error) -> SessionError {
    SessionError::Unavailable(format!("sessions service: {e}"))
}

/// The error a non-2xx answer stands for.
fn error_of(status: u16, code: &str, message: String, path: &str) -> SessionError {
    match code {
        "not_found" => SessionError::NotFound(SessionId(message)),
        "connection_lost" => SessionError::ConnectionLost(message),
        "invalid" | "bad_request" => SessionError::InvalidSpec(message),
        "start_failed" => SessionError::Start(message),
        "file" => SessionError::File {
            path: path.to_owned(),
            // The service says "file P: why"; keep the why.
            message: message
                .split_once(": ")
                .map_or(message.clone(), |(_, m)| m.to_owned()),
        },
        _ => SessionError::Unavailable(format!("{status} {code}: {message}")),
    }
}

async fn ok(resp: reqwest::Response, path: &str) -> Result<reqwest::Response, SessionError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
    Err(error_of(status, &code, message, path))
}

#[async_trait]
impl SessionBackend for SessionsClient {
    async fn start(&self, spec: &SessionSpec) -> Result<SessionId, SessionError> {
        Ok(SessionId(self.create(spec).await?.id))
    }

    async fn run(
        &self,
        id: &SessionId,
        command: &str,
        opts: RunOptions,
        sink: Option<mpsc::Sender<OutputChunk>>,
    ) -> Result<CommandOutput, SessionError> {
        let body = RunRequest {
            command: command.to_owned(),
            timeout_secs: opts.timeout.as_secs().max(1)
                + u64::from(opts.timeout.subsec_nanos() > 0),
            max_output_bytes: Some(opts.max_output_bytes),
        };
        // Not connected: the command never left. Anything later: its fate is unknown.
        let lost = |e: reqwest::Error| {
            if e.is_connect() {
                unavailable(e)
            } else {
                SessionError::ConnectionLost(format!("the sessions service connection failed: {e}"))
            }
        };
        let Some(sink) = sink else {
            let resp = self
                .req(reqwest::Method::POST, &format!("/v1/sessions/{id}/run"))
                .json(&body)
                .send()
                .await
                .map_err(lost)?;
            return ok(resp, "").await?.json().await.map_err(lost);
        };
        let resp = self
            .req(
                reqwest::Method::POST,
                &format!("/v1/sessions/{id}/run?stream=true"),
            )
            .json(&body)
            .send()
            .await
            .map_err(lost)?;
        let mut stream = ok(resp, "").await?.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.map_err(lost)?);
            while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line: StreamLine = serde_json::from_slice(&line).map_err(|e| {
                    SessionError::ConnectionLost(format!("garbled stream line: {e}"))
                })?;
                let decode = |s: &str| STANDARD.decode(s).map(Bytes::from);
                match line {
                    StreamLine::Stdout(b) => {
                        if let Ok(b) = decode(&b) {
                            let _ = sink.send(OutputChunk::Stdout(b)).await;
                        }
                    }
                    StreamLine::Stderr(b) => {
                        if let Ok(b) = decode(&b) {
                            let _ = sink.send(OutputChunk::Stderr(b)).await;
                        }
                    }
                    StreamLine::Result(out) => return Ok(out),
                    StreamLine::Error { code, message } => {
                        return Err(error_of(0, &code, message, ""));
                    }
                }
            }
        }
        Err(SessionError::ConnectionLost(
            "the stream ended before the command's result".into(),
        ))
    }

    async fn write_file(
        &self,
        id: &SessionId,
        path: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), SessionError> {
        let resp = self
            .req(reqwest::Method::PUT, &format!("/v1/sessions/{id}/files"))
            .query(&[("path", path), ("mode", &format!("{mode:o}"))])
            .body(bytes.to_vec())
            .send()
            .await
            .map_err(unavailable)?;
        ok(resp, path).await?;
        Ok(())
    }

    async fn read_file(
        &self,
        id: &SessionId,
        path: &str,
        max_bytes: usize,
    ) -> Result<FileContents, SessionError> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/v1/sessions/{id}/files"))
            .query(&[("path", path), ("max_bytes", &max_bytes.to_string())])
            .send()
            .await
            .map_err(unavailable)?;
        let resp = ok(resp, path).await?;
        let truncated = resp
            .headers()
            .get(TRUNCATED_HEADER)
            .is_some_and(|v| v == "true");
        let bytes = resp.bytes().await.map_err(unavailable)?.to_vec();
        Ok(FileContents { bytes, truncated })
    }

    async fn teardown(&self, id: &SessionId) -> Result<(), SessionError> {
        let resp = self
            .req(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"))
            .send()
            .await
            .map_err(unavailable)?;
        match ok(resp, "").await {
            Ok(_) | Err(SessionError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
