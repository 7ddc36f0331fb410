//! A small client for the control plane's REST API: TLS by default (`https://`), trusting the
//! mesh CA from a PEM file; plaintext only for an `http://` server (a control plane run with
//! `--insecure-plaintext`).

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::sync::Arc;
use weft_core::tls::Connector;

pub struct Api {
    base: String,
    http: Client<Connector, Full<Bytes>>,
    /// The API token sent as `Authorization: Bearer` on every call.
    token: Option<String>,
    /// Where the trusted roots came from, named when the server's certificate is refused.
    ca_source: Option<String>,
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
    /// A client for the API at `base`. An `https://` base needs `ca_pem`, the roots to trust
    /// (the control plane writes them to `ca.pem` in its data directory); `ca_source` names
    /// where they came from, for errors.
    pub fn new(base: &str, ca_pem: Option<&str>, ca_source: &str) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        let connector = match (base.split_once("://").map(|(s, _)| s), ca_pem) {
            (Some("http"), _) => Connector::plaintext(),
            (Some("https"), Some(pem)) => {
                let verifier = weft_core::tls::roots_verifier(pem, ca_source)?;
                let config = weft_core::tls::client_config(verifier, None, &[weft_core::tls::ALPN_HTTP1])?;
                Connector::tls(Arc::new(config))
            }
            (Some("https"), None) => anyhow::bail!(
                "--server {base}: TLS needs the mesh CA to trust: `weft login` (which pins it), --ca-file FILE or WEFT_CA_FILE (the control plane writes it to ca.pem in its data directory)"
            ),
            _ => anyhow::bail!("--server {base}: expected an https:// (or http://) URL"),
        };
        let mut api = Self::with_connector(base, connector);
        api.ca_source = ca_pem.map(|_| ca_source.to_string());
        Ok(api)
    }

    /// A client for the API at `base` over `connector` (e.g. one pinning a CA fingerprint).
    pub fn with_connector(base: String, connector: Connector) -> Self {
        Self {
            base,
            http: Client::builder(TokioExecutor::new()).build(connector),
            token: None,
            ca_source: None,
        }
    }

    /// Whether requests travel in clear.
    pub fn plaintext(&self) -> bool {
        self.base.starts_with("http://")
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
        let resp = self.http.request(req).await.map_err(|e| self.unreachable(&e))?;
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

    /// The error of a request that never got an answer, with its causes (a refused TLS
    /// certificate says why).
    fn unreachable(&self, error: &hyper_util::client::legacy::Error) -> anyhow::Error {
        let mut why = error.to_string();
        let mut next = std::error::Error::source(error);
        while let Some(e) = next {
            why.push_str(": ");
            why.push_str(&e.to_string());
            next = e.source();
        }
        // A root rotation re-signs the control plane's certificate; a CA saved before it no
        // longer names the signer once the old root has left the bundle.
        if why.contains("UnknownIssuer")
            && let Some(source) = &self.ca_source
        {
            why.push_str(&format!(
                "\nhint: the server's certificate is not signed by a root in {source}; if the mesh root was rotated since, trust the current ca.pem from the control plane's data directory (`weft login --ca-file FILE`, or --ca-file)"
            ));
        }
        anyhow!("cannot reach the control plane at {}: {why}", self.base)
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
        let resp = self.http.request(req).await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.context("reading the API's answer")?.to_bytes();
        if !status.is_success() {
            return Err(Refused::of(status, &bytes).into());
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
    }
}
