//! A small client for the control plane's REST API.

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub struct Api {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    /// The API token sent as `Authorization: Bearer` on every call.
    token: Option<String>,
}

/// A refusal from the API: its status and `{error, field}` body.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub error: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// The API's `{error, hint}` answer, or its text when it is not JSON.
    fn of(status: StatusCode, bytes: &[u8]) -> Self {
        let value: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        let mut error = value["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
        if let Some(hint) = value["hint"].as_str() {
            error = format!("{error}\nhint: {hint}");
        }
        Refused { status, error }
    }
}

// === impl Api ===

impl Api {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: Client::builder(TokioExecutor::new()).build_http(),
            token: None,
        }
    }

    /// Sends `token` with every call.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn authorize(&self, req: hyper::http::request::Builder) -> hyper::http::request::Builder {
        match &self.token {
            Some(t) => req.header("authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: String, headers: &[(&str, &str)]) -> anyhow::Result<Value> {
        self.call(Method::POST, path, Some(body), headers).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::DELETE, path, None, &[]).await
    }

    /// Opens a server-sent-event stream; calls `each` with every event's data until it returns
    /// `false` or the stream ends.
    pub async fn events(&self, path: &str, mut each: impl FnMut(Value) -> bool) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.base);
        let req = self
            .authorize(Request::get(&url))
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))
            .with_context(|| format!("invalid server URL {url}"))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| anyhow!("cannot reach the control plane at {}: {e}", self.base))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            return Err(Refused::of(status, &bytes).into());
        }
        let mut pending = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading the event stream")?;
            let Some(data) = frame.data_ref() else { continue };
            pending.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                for line in event.lines() {
                    if let Some(json) = line.strip_prefix("data:")
                        && let Ok(v) = serde_json::from_str(json.trim())
                        && !each(v)
                    {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>, headers: &[(&str, &str)]) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.authorize(Request::builder().method(method).uri(&url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .with_context(|| format!("invalid server URL {url}"))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| anyhow!("cannot reach the control plane at {}: {e}", self.base))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.context("reading the API's answer")?.to_bytes();
        if !status.is_success() {
            return Err(Refused::of(status, &bytes).into());
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
    }
}
