//! Dispatch of every subcommand, and the commands that talk to the REST API.

use crate::client::{Api, Refused};
use crate::output::{self, cell, table};
use crate::{AdminCommand, ApiTokenCommand, CaCommand, Cli, Command, EXIT_INVALID, IntentCommand, TokenCommand};
use anyhow::Context;
use serde_json::Value;
use std::path::Path;
use std::process::ExitCode;
use weft_api::Resource;

#[derive(clap::Args, Debug)]
pub struct EnableArgs {
    pub service: String,
    /// The mTLS mode to roll out: strict refuses plaintext callers, permissive accepts both.
    #[arg(long, value_enum)]
    pub mtls: MtlsArg,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The rollout's stages, comma-separated: a number is a percentage of the service's
    /// instances by traffic, anything else a namespace; the last must be 100.
    #[arg(long, default_value = "10,50,100", value_delimiter = ',')]
    pub stages: Vec<String>,
    /// How long each stage is observed before it is judged.
    #[arg(long, default_value = "30s")]
    pub bake: weft_api::Duration,
    /// Treated requests a stage needs before it is judged either way.
    #[arg(long, default_value_t = 100)]
    pub min_requests: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MtlsArg {
    Strict,
    Permissive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let format = cli.output;
    let (server, token_file, ca_file) = (cli.server.clone(), cli.token_file.clone(), cli.ca_file.clone());
    let command = match cli.command {
        Command::Up {
            no_traffic,
            api: addr,
            data_dir,
            rps,
            ha,
            intercept,
        } => {
            return crate::up::run(crate::up::Options {
                traffic: !no_traffic,
                ha,
                api: addr,
                data_dir,
                rps,
                intercept,
            })
            .await;
        }
        Command::Control {
            data_dir,
            metrics_open,
            api,
            grpc,
            trust_domain,
            cert_ttl,
            root_cert,
            root_key,
            sans,
            insecure_plaintext,
            reinit_store,
            store,
            store_prefix,
            store_ca,
            store_cert,
            store_key,
            replica,
            max_registering,
            api_idle_timeout,
        } => {
            let root = root_cert.zip(root_key);
            let store_tls = store_ca.map(|ca| weft_control::StoreTls {
                ca,
                client: store_cert.zip(store_key),
            });
            let cfg = weft_control::ControlConfig {
                data_dir,
                api,
                grpc,
                trust_domain,
                cert_ttl: cert_ttl.as_std(),
                root,
                metrics_open,
                sans,
                insecure_plaintext,
                reinit_store,
                store,
                store_prefix,
                store_tls,
                replica,
                max_registering,
                api_idle_timeout: api_idle_timeout.as_std(),
            };
            return control(cfg).await;
        }
        Command::Proxy(args) => return weft_proxy::cli::run(args).await.map_err(anyhow::Error::from_boxed),
        Command::Run(args) => return crate::run::run(*args).await,
        Command::RunApp(args) => return Ok(crate::run::exec_app(args)),
        Command::DemoApp(args) => return crate::demo_app::run(args).await,
        api_command => api_command,
    };
    // Only the commands that talk to the API need a server, a CA to trust and a credential.
    let profile = crate::login::resolve(server, token_file.as_deref(), ca_file.as_deref())?;
    if let Command::Login { ca_fingerprint } = &command {
        return login(&profile, token_file.as_deref(), ca_fingerprint.as_deref())
            .await
            .map(|()| ExitCode::SUCCESS);
    }
    let api = Api::new(&profile.server, profile.ca_pem.as_deref(), &profile.ca_source)?.with_token(profile.token.clone());
    let result = match command {
        Command::Up { .. }
        | Command::Control { .. }
        | Command::Proxy(_)
        | Command::Run(_)
        | Command::RunApp(_)
        | Command::DemoApp(_)
        | Command::Login { .. } => {
            unreachable!("local commands and login returned above")
        }
        Command::Apply { file, wait } => apply(&api, &file, wait.map(|w| w.as_std()), format).await,
        Command::Delete { file } => delete(&api, &file).await,
        Command::Get { kind, name } => get(&api, kind, name, format).await,
        Command::Diff { file } => diff(&api, &file).await,
        Command::History => history(&api, format).await,
        Command::Rollback { revision } => rollback(&api, revision).await,
        Command::Status => status(&api, format).await,
        Command::Top { once, interval } => top(&api, format, once, interval.as_std()).await,
        Command::Tap { service, count } => tap(&api, format, &service, count).await,
        Command::Whoami => api.get("/api/v1/whoami").await.and_then(|v| {
            if !output::structured(format, &v)? {
                say!("{} ({}) at {}", cell(&v, "name"), cell(&v, "role"), api.base());
            }
            Ok(())
        }),
        Command::Admin(AdminCommand::Token(cmd)) => api_tokens(&api, cmd, format).await,
        Command::Audit { since } => audit(&api, since, format).await,
        Command::Proxies => proxies(&api, format).await,
        Command::Intent(cmd) => intent(&api, cmd, format).await,
        Command::Enable(args) => enable(&api, args, format).await,
        Command::Token(cmd) => token(&api, cmd, format).await,
        Command::Check { within } => return check(&api, within.as_std()).await,
        Command::Ca(cmd) => {
            let ca = match cmd {
                CaCommand::Status => api.get("/api/v1/ca").await,
                CaCommand::Rotate => api.post("/api/v1/ca/rotate", String::new(), &[]).await,
            };
            ca.and_then(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("bundle");
                }
                if !output::structured(format, &v)? {
                    say!(
                        "trust domain {}  roots trusted {}  signing generation {}  rotation {}",
                        cell(&v, "trustDomain"),
                        cell(&v, "rootsTrusted"),
                        cell(&v, "generation"),
                        cell(&v, "rotation")
                    );
                }
                Ok(())
            })
        }
        Command::Bypass { service, state, namespace } => {
            let body = serde_json::json!({"enabled": state == OnOff::On, "namespace": namespace}).to_string();
            api.post(&format!("/api/v1/bypass/{service}"), body, &[("content-type", "application/json")])
                .await
                .map(|v| {
                    say!(
                        "bypass {} for {}/{}",
                        if v["bypass"] == true { "on" } else { "off" },
                        namespace,
                        service
                    );
                })
        }
        Command::Freeze { state } => {
            let body = serde_json::json!({"enabled": state == OnOff::On}).to_string();
            api.post("/api/v1/freeze", body, &[("content-type", "application/json")])
                .await
                .map(|v| {
                    say!(
                        "mesh {}",
                        if v["frozen"] == true {
                            "frozen: rollouts stopped, last-known-good pinned"
                        } else {
                            "unfrozen"
                        }
                    );
                })
        }
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => match e.downcast_ref::<Refused>() {
            Some(r) if r.status == hyper::StatusCode::BAD_REQUEST => {
                eprintln!("error: {}", r.error);
                Ok(ExitCode::from(EXIT_INVALID))
            }
            _ => match e.downcast_ref::<weft_api::Invalid>() {
                Some(invalid) => {
                    eprintln!("error: {invalid}");
                    Ok(ExitCode::from(EXIT_INVALID))
                }
                None => Err(e),
            },
        },
    }
}

async fn control(cfg: weft_control::ControlConfig) -> anyhow::Result<ExitCode> {
    let shutdown = weft_core::Shutdown::new();
    weft_core::shutdown::install(&shutdown);
    let (_, handle) = match weft_control::start(cfg, shutdown).await {
        Ok(started) => started,
        Err(e @ weft_control::StartError::Serving(weft_control::serving::ServingError::San { .. })) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(e) => return Err(e.into()),
    };
    handle.await?;
    Ok(ExitCode::SUCCESS)
}

async fn token(api: &Api, cmd: TokenCommand, format: output::Format) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            workload,
            service_account,
            ttl,
            uses,
        } => {
            let body = serde_json::json!({"workload": workload, "serviceAccount": service_account, "ttl": ttl.to_string(), "uses": uses})
                .to_string();
            let created = api.post("/api/v1/tokens", body, &[("content-type", "application/json")]).await?;
            if !output::structured(format, &created)? {
                say!("{}", cell(&created, "token"));
            }
            Ok(())
        }
        TokenCommand::List => {
            let tokens = api.get("/api/v1/tokens").await?;
            if output::structured(format, &tokens)? {
                return Ok(());
            }
            let rows: Vec<Vec<String>> = tokens
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let uses = match t["usesAllowed"].as_u64() {
                        Some(allowed) => format!("{}/{allowed}", cell(t, "uses")),
                        None => cell(t, "uses"),
                    };
                    vec![
                        cell(t, "id"),
                        cell(t, "workload"),
                        cell(t, "serviceAccount"),
                        cell(t, "expiresAt"),
                        uses,
                        cell(t, "state"),
                    ]
                })
                .collect();
            table(&["ID", "WORKLOAD", "SERVICE-ACCOUNT", "EXPIRES-AT", "USES", "STATE"], &rows);
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let revoked = api.post(&format!("/api/v1/tokens/{id}/revoke"), String::new(), &[]).await?;
            if !output::structured(format, &revoked)? {
                say!("token {id} of {} revoked", cell(&revoked, "workload"));
            }
            Ok(())
        }
    }
}

/// Reads and parses a resource file; errors name the file.
fn read_resources(file: &Path) -> anyhow::Result<(String, Vec<Resource>)> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {name}"))?;
    let resources = weft_api::resource::parse_resources(&text, &name)?;
    Ok((text, resources))
}

async fn apply(api: &Api, file: &Path, wait: Option<std::time::Duration>, format: output::Format) -> anyhow::Result<()> {
    let (text, _) = read_resources(file)?;
    let name = file.display().to_string();
    let applied = api.post("/api/v1/resources", text, &[("x-weft-source", &name)]).await?;
    let pending = applied["phase"].as_str().is_some_and(|p| p != "promoted");
    match wait {
        Some(within) if pending => {
            if !output::structured(format, &Value::Null)? {
                print_pending(&applied);
                say!("waiting up to {} for it to be applied...", weft_api::Duration(within));
            }
            let done = wait_applied(api, &cell(&applied, "intent"), within).await?;
            let applied = serde_json::json!({"revision": done["revision"], "changes": applied["changes"], "intent": applied["intent"], "phase": "promoted", "reason": "", "blockedBy": null});
            print_applied(&applied, format)
        }
        _ => print_applied(&applied, format),
    }
}

/// Prints the outcome of a plain change: applied, or not yet (queued or still rolling out).
fn print_applied(applied: &Value, format: output::Format) -> anyhow::Result<()> {
    if output::structured(format, applied)? {
        return Ok(());
    }
    match applied["phase"].as_str() {
        None | Some("promoted") => {
            for c in applied["changes"].as_array().into_iter().flatten() {
                say!("{} {}", key_of(c), cell(c, "op"));
            }
            say!("revision {}", applied["revision"]);
        }
        Some(_) => print_pending(applied),
    }
    Ok(())
}

/// `KIND/NAMESPACE/NAME` of a change entry.
fn key_of(change: &Value) -> String {
    let k = &change["key"];
    format!("{}/{}/{}", cell(k, "kind"), cell(k, "namespace"), cell(k, "name"))
}

/// A change accepted but not applied: what would change, why it waits and what can be done.
fn print_pending(applied: &Value) {
    let id = cell(applied, "intent");
    for c in applied["changes"].as_array().into_iter().flatten() {
        say!("{}: not {} yet", key_of(c), cell(c, "op"));
    }
    let blocker = &applied["blockedBy"];
    // What can be done, one command a line, the explanations in one column whatever the ids.
    let mut next: Vec<(String, String)> = Vec::new();
    match blocker["by"].as_str() {
        Some("intent") => {
            let other = cell(blocker, "id");
            let phase = cell(blocker, "phase");
            let services = blocker["services"]
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            say!(
                "queued as intent {id} behind intent {other} ({} mode, {phase}) on {services}; {id} starts when {other} is finished",
                cell(blocker, "mode")
            );
            if phase == "awaiting-approval" {
                next.push((
                    format!("weft intent approve {other}"),
                    format!("lets {other} go on (one approval per stage)"),
                ));
            }
            next.push((format!("weft intent abort {other}"), format!("rolls {other} back, and {id} starts")));
        }
        Some("freeze") => {
            say!("queued as intent {id}: the mesh is frozen");
            next.push(("weft freeze off".into(), "lets queued changes start".into()));
        }
        _ => say!("intent {id} is still rolling out ({}), not applied yet", cell(applied, "phase")),
    }
    next.push((
        format!("weft intent show {id}"),
        format!("follows it; `weft intent abort {id}` withdraws this change"),
    ));
    let width = next.iter().map(|(command, _)| command.len()).max().unwrap_or(0);
    for (command, what) in next {
        say!("  {command:<width$}   {what}");
    }
}

/// Polls intent `id` until it is promoted (its view), fails or rolls back (an error with the
/// reason), or `within` passes (an error saying what it still waits for).
async fn wait_applied(api: &Api, id: &str, within: std::time::Duration) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let intent = api.get(&format!("/api/v1/intents/{id}")).await?;
        let reason = || {
            intent["decisions"]
                .as_array()
                .and_then(|d| d.last())
                .map(|d| cell(d, "reason"))
                .unwrap_or_default()
        };
        match intent["phase"].as_str().unwrap_or_default() {
            "promoted" => return Ok(intent),
            phase @ ("rolled-back" | "failed") => anyhow::bail!("intent {id} {phase}: {}", reason()),
            phase if std::time::Instant::now() >= deadline => {
                let behind = match intent["blockedBy"]["by"].as_str() {
                    Some("intent") => format!(
                        " behind intent {} ({})",
                        cell(&intent["blockedBy"], "id"),
                        cell(&intent["blockedBy"], "phase")
                    ),
                    Some("freeze") => " behind the freeze".to_string(),
                    _ => String::new(),
                };
                anyhow::bail!(
                    "gave up waiting after {}: intent {id} is still {phase}{behind}; it stays queued (`weft intent show {id}` follows it, `weft intent abort {id}` withdraws it)",
                    weft_api::Duration(within)
                );
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

async fn delete(api: &Api, file: &Path) -> anyhow::Result<()> {
    let (_, resources) = read_resources(file)?;
    for r in resources {
        let k = r.key();
        let out = api
            .delete(&format!("/api/v1/resources/{}/{}/{}", k.kind, k.namespace, k.name))
            .await?;
        match out["phase"].as_str() {
            None | Some("promoted") => say!("{k} deleted (revision {})", out["revision"]),
            Some(_) => print_pending(&out),
        }
    }
    Ok(())
}

/// The KIND `weft get` takes: one of the resource kinds as [`kind_matches`] reads them; any
/// other is a usage error naming the value (it listed nothing, and exited 0).
pub(crate) fn resource_kind(kind: &str) -> Result<String, String> {
    ["TrafficPolicy", "SecurityPolicy"]
        .iter()
        .any(|k| kind_matches(kind, k))
        .then(|| kind.to_string())
        .ok_or_else(|| format!("unknown kind {kind:?}: one of TrafficPolicy (trafficpolicies, tp), SecurityPolicy (securitypolicies, sp)"))
}

fn kind_matches(filter: &str, kind: &str) -> bool {
    let f = filter.to_ascii_lowercase();
    let k = kind.to_ascii_lowercase();
    let plural = k
        .strip_suffix('y')
        .map(|stem| format!("{stem}ies"))
        .unwrap_or_else(|| format!("{k}s"));
    f == k || f == plural || (f == "tp" && k == "trafficpolicy") || (f == "sp" && k == "securitypolicy")
}

async fn get(api: &Api, kind: Option<String>, name: Option<String>, format: output::Format) -> anyhow::Result<()> {
    let all = api.get("/api/v1/resources").await?;
    let items: Vec<Value> = all["resources"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| kind.as_deref().is_none_or(|k| kind_matches(k, r["kind"].as_str().unwrap_or(""))))
        .filter(|r| name.as_deref().is_none_or(|n| r["metadata"]["name"] == n))
        .collect();
    if let (Some(k), Some(n)) = (&kind, &name)
        && items.is_empty()
    {
        anyhow::bail!("{k} {n} not found");
    }
    if output::structured(format, &Value::Array(items.clone()))? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|r| {
            let service = r["spec"]["service"]
                .as_str()
                .or(r["spec"]["selector"]["service"].as_str())
                .unwrap_or("-");
            vec![
                cell(r, "kind"),
                cell(&r["metadata"], "namespace"),
                cell(&r["metadata"], "name"),
                service.to_string(),
            ]
        })
        .collect();
    table(&["KIND", "NAMESPACE", "NAME", "SERVICE"], &rows);
    say!("revision {}", all["revision"]);
    Ok(())
}

async fn diff(api: &Api, file: &Path) -> anyhow::Result<()> {
    let (_, resources) = read_resources(file)?;
    let live = api.get("/api/v1/resources").await?;
    let current: Vec<Resource> = serde_json::from_value(live["resources"].clone()).context("decoding live resources")?;
    for r in resources {
        let new = serde_json::to_string_pretty(&r)?;
        match current.iter().find(|c| c.key() == r.key()) {
            None => {
                say!("+ {} (created)", r.key());
                for l in new.lines() {
                    say!("+ {l}");
                }
            }
            Some(old) if *old == r => say!("= {} (unchanged)", r.key()),
            Some(old) => {
                say!("~ {} (configured)", r.key());
                for (mark, line) in crate::diff::lines(&serde_json::to_string_pretty(old)?, &new) {
                    if mark != ' ' {
                        say!("{mark} {line}");
                    }
                }
            }
        }
    }
    Ok(())
}

async fn history(api: &Api, format: output::Format) -> anyhow::Result<()> {
    let revs = api.get("/api/v1/revisions").await?;
    if output::structured(format, &revs)? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = revs
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let secs = r["timeMs"].as_u64().unwrap_or(0) / 1000;
            vec![cell(r, "revision"), format!("{secs}"), cell(r, "resources"), cell(r, "summary")]
        })
        .collect();
    table(&["REVISION", "UNIX-TIME", "RESOURCES", "CHANGE"], &rows);
    Ok(())
}

async fn rollback(api: &Api, revision: u64) -> anyhow::Result<()> {
    let out = api
        .post(
            "/api/v1/rollback",
            serde_json::json!({ "revision": revision }).to_string(),
            &[("content-type", "application/json")],
        )
        .await?;
    say!(
        "rolled back to the resources of revision {revision}: now revision {}",
        out["revision"]
    );
    Ok(())
}

/// Pins the mesh CA (from `--ca-file`, or fetched from the server over a connection that must
/// prove the CA with `fingerprint`), checks the token against the server, then saves server, CA
/// and token for this user.
async fn login(profile: &crate::login::Profile, token_file: Option<&Path>, fingerprint: Option<&str>) -> anyhow::Result<()> {
    let Some(token_file) = token_file else {
        anyhow::bail!(
            "weft login needs --token-file FILE (admin.token in the control plane's data directory, or a token from `weft admin token create`)"
        );
    };
    let token = crate::login::read_token_file(token_file)?;
    let server = profile.server.trim_end_matches('/').to_string();
    let ca_pem = match (&profile.ca_pem, fingerprint) {
        _ if server.starts_with("http://") => None,
        (Some(pem), _) => Some(pem.clone()),
        (None, Some(pin)) => {
            // Whoever answers must present a chain holding the root with this fingerprint; what it
            // then says its CA is can be trusted.
            let verifier = std::sync::Arc::new(weft_core::tls::PinnedVerifier::new(pin));
            let config = weft_core::tls::client_config(verifier, None, &[weft_core::tls::ALPN_HTTP1])?;
            let pinned = Api::with_connector(server.clone(), weft_core::tls::Connector::tls(std::sync::Arc::new(config)))
                .with_token(Some(token.clone()));
            let ca = pinned
                .get("/api/v1/ca")
                .await
                .with_context(|| format!("{server} did not prove the CA with fingerprint {pin}"))?;
            Some(
                ca["bundle"]
                    .as_str()
                    .context("the control plane's /api/v1/ca has no bundle")?
                    .to_string(),
            )
        }
        (None, None) => anyhow::bail!(
            "weft login {server}: name the mesh CA to trust with --ca-file FILE (ca.pem in the control plane's data directory) or --ca-fingerprint SHA256 (logged by `weft control` at start)"
        ),
    };
    let api = Api::new(&server, ca_pem.as_deref(), &profile.ca_source)?.with_token(Some(token.clone()));
    let me = api
        .get("/api/v1/whoami")
        .await
        .with_context(|| format!("{server} refused the token in {}", token_file.display()))?;
    let path = crate::login::save(&crate::login::Saved {
        server: server.clone(),
        token,
        ca_pem,
    })?;
    say!(
        "logged in to {server} as {} ({}); saved in {}",
        cell(&me, "name"),
        cell(&me, "role"),
        path.display()
    );
    Ok(())
}

async fn api_tokens(api: &Api, cmd: ApiTokenCommand, format: output::Format) -> anyhow::Result<()> {
    match cmd {
        ApiTokenCommand::Create { name, role, ttl } => {
            let body = serde_json::json!({"name": name, "role": role, "ttl": ttl.map(|t| t.to_string())}).to_string();
            let v = api
                .post("/api/v1/admin/tokens", body, &[("content-type", "application/json")])
                .await?;
            say!("{}", cell(&v, "token"));
            Ok(())
        }
        ApiTokenCommand::List => {
            let v = api.get("/api/v1/admin/tokens").await?;
            if output::structured(format, &v)? {
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let expires = t["expiresMs"].as_u64().map(output::time_ms).unwrap_or_else(|| "never".into());
                    vec![
                        cell(t, "name"),
                        cell(t, "role"),
                        output::time_ms(t["createdMs"].as_u64().unwrap_or(0)),
                        expires,
                    ]
                })
                .collect();
            table(&["NAME", "ROLE", "CREATED", "EXPIRES"], &rows);
            Ok(())
        }
        ApiTokenCommand::Revoke { name } => {
            api.delete(&format!("/api/v1/admin/tokens/{name}")).await?;
            say!("token {name} revoked");
            Ok(())
        }
    }
}

async fn audit(api: &Api, since: Option<weft_api::Duration>, format: output::Format) -> anyhow::Result<()> {
    let path = match since {
        Some(d) => format!("/api/v1/audit?since={d}"),
        None => "/api/v1/audit".to_string(),
    };
    let v = api.get(&path).await?;
    if output::structured(format, &v)? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                output::time_ms(e["timeMs"].as_u64().unwrap_or(0)),
                cell(e, "actor"),
                cell(e, "role"),
                cell(e, "source"),
                format!("{} {}", cell(e, "method"), cell(e, "path")),
                cell(e, "status"),
            ]
        })
        .collect();
    table(&["TIME", "ACTOR", "ROLE", "SOURCE", "CALL", "STATUS"], &rows);
    Ok(())
}

async fn tap(api: &Api, format: output::Format, service: &str, count: Option<u64>) -> anyhow::Result<()> {
    let mut seen = 0u64;
    let structured = !matches!(format, output::Format::Table);
    api.events(&format!("/api/v1/tap/{service}"), |e| {
        if structured {
            say!("{e}");
        } else {
            say!(
                "{} {:<8} {} {} {}{} -> {} {} {:.1}ms {} -> {}",
                cell(&e, "proxy"),
                cell(&e, "direction"),
                cell(&e, "method"),
                cell(&e, "authority"),
                cell(&e, "path"),
                if cell(&e, "route").is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", cell(&e, "route"))
                },
                cell(&e, "status"),
                cell(&e, "reason"),
                e["durationMs"].as_f64().unwrap_or(0.0),
                cell(&e, "source"),
                cell(&e, "destination"),
            );
        }
        seen += 1;
        count.is_none_or(|n| seen < n)
    })
    .await
}

async fn top(api: &Api, format: output::Format, once: bool, interval: std::time::Duration) -> anyhow::Result<()> {
    loop {
        let t = api.get("/api/v1/top").await?;
        if output::structured(format, &t)? {
            if once {
                return Ok(());
            }
        } else {
            if !once {
                say!(
                    "\x1b[2J\x1b[H{}",
                    "weft top: destination routes over the last 10 s (Ctrl-C to stop)"
                );
            }
            let ms = |v: &serde_json::Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
            let rows: Vec<Vec<String>> = t["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        cell(r, "service"),
                        cell(r, "route"),
                        format!("{:.1}", r["rps"].as_f64().unwrap_or(0.0)),
                        r["successRate"].as_f64().map(|x| format!("{x:.2}%")).unwrap_or_else(|| "-".into()),
                        ms(&r["p50Ms"]),
                        ms(&r["p99Ms"]),
                    ]
                })
                .collect();
            table(&["SERVICE", "ROUTE", "RPS", "SUCCESS", "P50-MS", "P99-MS"], &rows);
            if once {
                return Ok(());
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn status(api: &Api, format: output::Format) -> anyhow::Result<()> {
    let s = api.get("/api/v1/status").await?;
    if output::structured(format, &s)? {
        return Ok(());
    }
    say!(
        "revision {}  loop {}  telemetry signals {}",
        s["revision"],
        cell(&s["loop"], "phase"),
        s["telemetrySignals"]
    );
    let rows: Vec<Vec<String>> = s["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            vec![
                cell(v, "name"),
                cell(v, "cluster"),
                cell(v, "rps"),
                cell(v, "errors"),
                format!("{}%", cell(v, "errorRate")),
                cell(v, "p99Ms"),
                cell(v, "policyRevision"),
                match v["mtlsShare"].as_f64() {
                    Some(share) => format!("{} {share:.0}%", cell(v, "mtls")),
                    None => cell(v, "mtls"),
                },
                format!("{}/{}", cell(&v["proxies"], "inSync"), cell(&v["proxies"], "total")),
            ]
            .into_iter()
            .chain(output::cost_cells(&v["sidecars"]))
            .collect()
        })
        .collect();
    let header = [
        "SERVICE",
        "CLUSTER",
        "RPS",
        "ERRORS",
        "ERROR-RATE",
        "P99-MS",
        "POLICY-REV",
        "MTLS",
        "IN-SYNC",
    ];
    table(&[&header[..], &output::COST_HEADER[..]].concat(), &rows);
    Ok(())
}

async fn proxies(api: &Api, format: output::Format) -> anyhow::Result<()> {
    let ps = api.get("/api/v1/proxies").await?;
    if output::structured(format, &ps)? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = ps
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                cell(p, "id"),
                cell(p, "service"),
                cell(p, "cluster"),
                cell(p, "appliedRevision"),
                cell(p, "address"),
                cell(p, "lastNack"),
            ]
            .into_iter()
            .chain(output::cost_cells(&p["cost"]))
            .collect()
        })
        .collect();
    let header = ["PROXY", "SERVICE", "CLUSTER", "REVISION", "ADDRESS", "LAST-NACK"];
    table(&[&header[..], &output::COST_HEADER[..]].concat(), &rows);
    Ok(())
}

/// `weft enable`: the SecurityPolicy that sets the service's mTLS mode (its service-wide one
/// with `mtls` changed, or a new `SERVICE-mtls`), submitted as an intent like any other change.
async fn enable(api: &Api, args: EnableArgs, format: output::Format) -> anyhow::Result<()> {
    let (service, namespace) = (&args.service, &args.namespace);
    let mode = match args.mtls {
        MtlsArg::Strict => "strict",
        MtlsArg::Permissive => "permissive",
    };
    let status = api.get("/api/v1/status").await?;
    let services: Vec<&Value> = status["services"].as_array().into_iter().flatten().collect();
    if !services.iter().any(|s| s["name"] == *service && s["namespace"] == *namespace) {
        let known: Vec<String> = services
            .iter()
            .map(|s| format!("{}/{}", cell(s, "namespace"), cell(s, "name")))
            .collect();
        anyhow::bail!("no service {namespace}/{service} in the mesh (known: {})", known.join(", "));
    }
    let policy = mtls_policy(&api.get("/api/v1/resources").await?, namespace, service, mode)?;
    let stages: Vec<Value> = args
        .stages
        .iter()
        .map(|s| match s.parse::<f64>() {
            Ok(percent) => serde_json::json!(percent),
            Err(_) => serde_json::json!({ "namespaces": [s] }),
        })
        .collect();
    let intent = serde_json::json!({
        "apiVersion": weft_api::resource::API_VERSION,
        "kind": "Intent",
        "metadata": { "namespace": namespace },
        "spec": {
            "title": format!("{mode} mTLS on {namespace}/{service}"),
            "target": service,
            "change": { "apply": [policy] },
            "rollout": { "stages": stages, "bake": args.bake.to_string() },
            "slo": { "minRequests": args.min_requests },
        }
    });
    let out = api
        .post("/api/v1/intents", intent.to_string(), &[("x-weft-source", "weft enable")])
        .await?;
    if !output::structured(format, &out)? {
        say!(
            "{} queued: {} (stages {}, bake {}); `weft intent show {}` follows it",
            cell(&out, "id"),
            cell(&out, "title"),
            out["stages"],
            args.bake,
            cell(&out, "id")
        );
    }
    Ok(())
}

/// The service-wide SecurityPolicy of `namespace/service` with its mTLS set to `mode`: the
/// existing one changed (so its authorization stays), or a new one.
fn mtls_policy(resources: &Value, namespace: &str, service: &str, mode: &str) -> anyhow::Result<Value> {
    let all = resources["resources"].as_array().cloned().unwrap_or_default();
    let of_service = |r: &&Value| {
        r["kind"] == "SecurityPolicy" && r["metadata"]["namespace"] == namespace && r["spec"]["selector"]["service"] == service
    };
    let service_wide = |r: &&Value| r["spec"]["selector"]["labels"].as_object().is_none_or(|l| l.is_empty());
    if let Some(existing) = all.iter().filter(of_service).find(service_wide) {
        if existing["spec"]["mtls"] == mode {
            anyhow::bail!(
                "{namespace}/{service} is already {mode} (SecurityPolicy {})",
                cell(&existing["metadata"], "name")
            );
        }
        let mut policy = existing.clone();
        policy["spec"]["mtls"] = Value::from(mode);
        return Ok(policy);
    }
    let name = format!("{service}-mtls");
    if all
        .iter()
        .any(|r| r["kind"] == "SecurityPolicy" && r["metadata"]["namespace"] == namespace && r["metadata"]["name"] == name.as_str())
    {
        anyhow::bail!(
            "SecurityPolicy {namespace}/{name} exists and is not {service}'s service-wide policy: set its mTLS with `weft intent submit`"
        );
    }
    Ok(serde_json::json!({
        "apiVersion": weft_api::resource::API_VERSION,
        "kind": "SecurityPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "selector": { "service": service }, "mtls": mode },
    }))
}

async fn intent(api: &Api, cmd: IntentCommand, format: output::Format) -> anyhow::Result<()> {
    match cmd {
        IntentCommand::Submit { file } => {
            let name = file.display().to_string();
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {name}"))?;
            weft_api::resource::parse_objects(&text, &name)?;
            let out = api.post("/api/v1/intents", text, &[("x-weft-source", &name)]).await?;
            if !output::structured(format, &out)? {
                say!(
                    "{} queued: {} on {} ({} mode, stages {})",
                    cell(&out, "id"),
                    cell(&out, "title"),
                    cell(&out, "target"),
                    cell(&out, "mode"),
                    out["stages"]
                );
            }
        }
        IntentCommand::List => {
            let all = api.get("/api/v1/intents").await?;
            if !output::structured(format, &all)? {
                let rows: Vec<Vec<String>> = all
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        vec![
                            cell(i, "id"),
                            cell(i, "target"),
                            cell(i, "title"),
                            cell(i, "scope"),
                            cell(i, "mode"),
                            cell(i, "phase"),
                            format!("{}/{}", cell(i, "stage"), i["stages"].as_array().map(Vec::len).unwrap_or(0)),
                            cell(i, "lastDecision"),
                        ]
                    })
                    .collect();
                table(
                    &["ID", "TARGET", "TITLE", "SCOPE", "MODE", "PHASE", "STAGE", "LAST-DECISION"],
                    &rows,
                );
            }
        }
        IntentCommand::Show { id } => {
            let i = api.get(&format!("/api/v1/intents/{id}")).await?;
            if !output::structured(format, &i)? {
                say!(
                    "{}  {}  target {}  scope {}  {} mode",
                    cell(&i, "id"),
                    cell(&i, "title"),
                    cell(&i, "target"),
                    cell(&i, "scope"),
                    cell(&i, "mode")
                );
                say!(
                    "phase {}  stage {} of {}  candidate revision {}  promoted revision {}",
                    cell(&i, "phase"),
                    i["stage"].as_u64().unwrap_or(0) + 1,
                    i["stages"],
                    cell(&i, "candidate"),
                    cell(&i, "revision")
                );
                match i["blockedBy"]["by"].as_str() {
                    Some("intent") => say!(
                        "waits behind intent {} ({})",
                        cell(&i["blockedBy"], "id"),
                        cell(&i["blockedBy"], "phase")
                    ),
                    Some("freeze") => say!("waits for the freeze to end (`weft freeze off`)"),
                    _ => {}
                }
                // Only a running stage treats proxies; the decisions below say which it did.
                let treated = i["treated"]
                    .as_array()
                    .map(|t| t.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                say!(
                    "treated: {}",
                    if treated.is_empty() {
                        "none now (no stage is running)"
                    } else {
                        &treated
                    }
                );
                say!("\ndecisions:");
                for d in i["decisions"].as_array().into_iter().flatten() {
                    let label = match d["namespaces"].as_array() {
                        Some(ns) => format!("namespaces {}", ns.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")),
                        None => format!("{}%", cell(d, "share")),
                    };
                    say!(
                        "  stage {} ({label}): {}: {}",
                        cell(d, "stage"),
                        cell(d, "outcome"),
                        cell(d, "reason")
                    );
                    if let Some(cost) = d["cost"]["summary"].as_str() {
                        say!("    {cost}");
                    }
                }
                say!("\nledger:");
                for e in i["ledger"].as_array().into_iter().flatten() {
                    say!(
                        "  {}  {}  {}  {}",
                        cell(e, "timeMs"),
                        cell(e, "actor"),
                        cell(e, "event"),
                        cell(e, "detail")
                    );
                }
            }
        }
        IntentCommand::Approve { id } => {
            let i = api.post(&format!("/api/v1/intents/{id}/approve"), String::new(), &[]).await?;
            say!(
                "{} approved: stage {} will start",
                cell(&i, "id"),
                i["stage"].as_u64().unwrap_or(0) + 1
            );
        }
        IntentCommand::Abort { id } => {
            let i = api.post(&format!("/api/v1/intents/{id}/abort"), String::new(), &[]).await?;
            say!("{} {}", cell(&i, "id"), cell(&i, "phase"));
        }
    }
    Ok(())
}

/// `MAJOR.MINOR` of a version such as `0.1.0` (`None` when it is not one).
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether two versions are more than one minor version apart (or of different majors, or
/// not versions at all): the wire contract is only promised across one minor version.
fn skewed(a: &str, b: &str) -> bool {
    match (major_minor(a), major_minor(b)) {
        (Some((major_a, minor_a)), Some((major_b, minor_b))) => major_a != major_b || minor_a.abs_diff(minor_b) > 1,
        _ => true,
    }
}

/// Every (replica, proxy) and (replica, replica) pair whose versions are skewed: the replicas
/// as the status lists them (`controlPlane.replicas`, or the one answering on a control plane
/// without the list), each proxy as it reported. Proxies that report no version (older than the
/// field) are not judged.
fn version_skew(control_plane: &Value, proxies: &Value) -> Vec<String> {
    let mut replicas: Vec<(String, String)> = control_plane["replicas"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, version)| Some((name.clone(), version.as_str()?.to_string())))
        .collect();
    if replicas.is_empty()
        && let Some(version) = control_plane["version"].as_str()
    {
        replicas.push((cell(control_plane, "replica"), version.to_string()));
    }
    let mut warnings = Vec::new();
    for (i, (a, version_a)) in replicas.iter().enumerate() {
        for (b, version_b) in &replicas[i + 1..] {
            if skewed(version_a, version_b) {
                warnings.push(format!(
                    "version skew: replica {a} runs {version_a}, replica {b} runs {version_b} (more than one minor version apart)"
                ));
            }
        }
    }
    for p in proxies.as_array().into_iter().flatten() {
        let Some(version) = p["version"].as_str().filter(|v| !v.is_empty()) else {
            continue;
        };
        for (replica, replica_version) in &replicas {
            if skewed(version, replica_version) {
                warnings.push(format!(
                    "version skew: proxy {} runs {version}, replica {replica} runs {replica_version} (more than one minor version apart)",
                    cell(p, "id")
                ));
            }
        }
    }
    warnings
}

/// Warnings about what will break soon: certificates near expiry, proxies out of sync, versions
/// too far apart.
async fn check(api: &Api, within: std::time::Duration) -> anyhow::Result<ExitCode> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let ca = api.get("/api/v1/ca").await?;
    let proxies = api.get("/api/v1/proxies").await?;
    let status = api.get("/api/v1/status").await?;
    let mut warnings = Vec::new();
    if api.plaintext() || status["controlPlane"]["tls"] == false {
        warnings.push(
            "the control plane runs with --insecure-plaintext: the API, join tokens and every pushed config cross the network unencrypted, and proxies cannot renew once their tokens expire".to_string(),
        );
    }
    let root = ca["rootNotAfter"].as_u64().unwrap_or(0);
    if root <= now + 30 * 86_400 {
        warnings.push(format!(
            "the root CA of {} expires in {} s (rotate it)",
            cell(&ca, "trustDomain"),
            root.saturating_sub(now)
        ));
    }
    for p in proxies.as_array().into_iter().flatten() {
        match p["certExpiry"].as_u64() {
            None => warnings.push(format!("{} has no workload certificate", cell(p, "id"))),
            Some(t) if t <= now + within.as_secs() => {
                warnings.push(format!("{}: certificate expires in {} s", cell(p, "id"), t.saturating_sub(now)))
            }
            _ => {}
        }
        if let Some(nack) = p["lastNack"].as_str() {
            warnings.push(format!("{} refused its last config: {nack}", cell(p, "id")));
        }
    }
    warnings.extend(version_skew(&status["controlPlane"], &proxies));
    for s in status["services"].as_array().into_iter().flatten() {
        if s["proxies"]["inSync"] != s["proxies"]["total"] {
            warnings.push(format!(
                "{}: {}/{} proxies on their assigned revision",
                cell(s, "name"),
                cell(&s["proxies"], "inSync"),
                cell(&s["proxies"], "total")
            ));
        }
    }
    for w in &warnings {
        say!("warning: {w}");
    }
    if warnings.is_empty() {
        say!(
            "ok: {} proxies, root CA valid for {} days",
            proxies.as_array().map(Vec::len).unwrap_or(0),
            root.saturating_sub(now) / 86_400
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::{mtls_policy, version_skew};
    use serde_json::json;

    /// Replicas mid-upgrade: one minor version apart is fine, two are named, once per pair.
    #[test]
    fn replicas_more_than_one_minor_version_apart_are_named() {
        let control_plane = json!({"replicas": {"r0": "0.1.0", "r1": "0.2.3", "r2": "0.3.0"}});
        let warnings = version_skew(&control_plane, &json!([]));
        assert_eq!(
            warnings,
            ["version skew: replica r0 runs 0.1.0, replica r2 runs 0.3.0 (more than one minor version apart)"]
        );
        let even = json!({"replicas": {"r0": "0.2.0", "r1": "0.3.1"}});
        assert!(version_skew(&even, &json!([])).is_empty());
    }

    fn policy(name: &str, labels: serde_json::Value, mtls: &str) -> serde_json::Value {
        json!({
            "apiVersion": "weft/v1", "kind": "SecurityPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": {"service": "orders", "labels": labels}, "mtls": mtls,
                     "authorization": {"default": "deny", "rules": [{"action": "allow", "from": {"namespaces": ["default"]}}]}},
        })
    }

    #[test]
    fn enable_changes_the_service_wide_policy_or_writes_one() {
        // The service-wide policy keeps its authorization; only mtls changes.
        let existing = json!({"resources": [policy("orders-authz", json!({}), "permissive")]});
        let strict = mtls_policy(&existing, "default", "orders", "strict").unwrap();
        assert_eq!(strict, policy("orders-authz", json!({}), "strict"));
        let already = json!({"resources": [strict]});
        let error = mtls_policy(&already, "default", "orders", "strict").unwrap_err().to_string();
        assert_eq!(error, "default/orders is already strict (SecurityPolicy orders-authz)");
        // A policy for some of its workloads only is left alone: a new service-wide one.
        let labelled = json!({"resources": [policy("orders-canary", json!({"version": "v2"}), "strict")]});
        let new = mtls_policy(&labelled, "default", "orders", "strict").unwrap();
        assert_eq!(new["metadata"]["name"], "orders-mtls");
        assert_eq!(new["spec"], json!({"selector": {"service": "orders"}, "mtls": "strict"}));
        // ... unless that name is taken by such a policy.
        let taken = json!({"resources": [policy("orders-mtls", json!({"version": "v2"}), "off")]});
        let error = mtls_policy(&taken, "default", "orders", "strict").unwrap_err().to_string();
        assert!(error.starts_with("SecurityPolicy default/orders-mtls exists"), "{error}");
    }
}
