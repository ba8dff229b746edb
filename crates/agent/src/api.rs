//! The control API: HTTP/1.1 with JSON bodies on a unix socket (mode 0600, so only the
//! agent's user reaches it), and Prometheus metrics on an optional TCP listener.
//!
//! | method and path | what |
//! | --- | --- |
//! | `GET /v1/host` | host name, version, counts |
//! | `GET /v1/adapters` | adapters, their VMs, what sysfs shows |
//! | `GET /v1/vms` | every VM |
//! | `POST /v1/vms` | create a VM ([`CreateVm`]) |
//! | `GET /v1/vms/{name}` | one VM with its path, reason, metrics, history |
//! | `DELETE /v1/vms/{name}` | log out and forget a VM |
//! | `POST /v1/vms/{name}/scsi` | one SCSI command through the VM's path ([`ScsiPassthrough`]) |
//! | `POST /v1/vms/{name}/migrate` | start moving the VM to another agent ([`MigrateRequest`]); 202 |
//! | `GET /v1/migrations` | the last migration of each VM from this host |
//! | `GET /v1/migrations/{name}` | one VM's last migration: phase, paths, switchover time |
//! | `GET /metrics` | Prometheus text format |
//!
//! Errors are `{"error": "one line"}` with 400 (bad request), 404 (unknown), 405, 409
//! (conflict), 413 (body too large), 422 (data path cannot be brought up) or 500.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};

use crate::host::{Agent, AgentError};
use crate::migration::protocol::{from_hex as parse_hex, to_hex};
use crate::model::{CreateVm, ErrorBody, MigrateRequest, ScsiPassthrough, ScsiResult};

/// Largest request body (a SCSI passthrough carries at most 1 MiB of data, base64).
const MAX_BODY: usize = 2 << 20;

/// Binds the control socket: parent directory created (0700), a stale socket file
/// replaced, but not one another agent still answers on; the socket gets mode 0600.
pub fn bind_control_socket(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another agent is serving {} (stop it first)",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    Ok(listener)
}

/// Serves the control API until the listener fails.
pub async fn serve_control(agent: Agent, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_connection(agent.clone(), stream, true),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Serves `GET /metrics` (and nothing else) on a TCP listener.
pub async fn serve_metrics(agent: Agent, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_connection(agent.clone(), stream, false),
            Err(e) => accept_failed(e).await,
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// One HTTP/1.1 connection; `control` selects the whole API or metrics only.
fn spawn_connection<S>(agent: Agent, stream: S, control: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let agent = agent.clone();
            async move { Ok::<_, Infallible>(handle(&agent, req, control).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
}

type Reply = Response<Full<Bytes>>;

fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    json(
        status,
        &ErrorBody {
            error: message.into(),
        },
    )
}

fn agent_error(e: AgentError) -> Reply {
    let status = match &e {
        AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AgentError::NotFound(_) => StatusCode::NOT_FOUND,
        AgentError::Conflict(_) => StatusCode::CONFLICT,
        AgentError::Unavailable(_) => StatusCode::UNPROCESSABLE_ENTITY,
        AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_BODY} bytes"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed request: {e}")))
}

async fn handle(agent: &Agent, req: Request<Incoming>, control: bool) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    if !control && parts.as_slice() != ["metrics"] {
        return error(StatusCode::NOT_FOUND, "only /metrics is served here");
    }
    let reply = match (&method, parts.as_slice()) {
        (&Method::GET, ["metrics"]) => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(agent.metrics_text())))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        (&Method::GET, ["v1", "host"]) => json(StatusCode::OK, &agent.host_view()),
        (&Method::GET, ["v1", "adapters"]) => json(StatusCode::OK, &agent.adapters()),
        (&Method::GET, ["v1", "vms"]) => {
            let views: Vec<_> = agent.vms().iter().map(|vm| vm.view()).collect();
            json(StatusCode::OK, &views)
        }
        (&Method::POST, ["v1", "vms"]) => match body_json::<CreateVm>(req).await {
            Err(r) => r,
            Ok(create) => match agent.create_vm(create).await {
                Ok(view) => json(StatusCode::CREATED, &view),
                Err(e) => agent_error(e),
            },
        },
        (&Method::GET, ["v1", "vms", name]) => match agent.vm(name) {
            Some(vm) => json(StatusCode::OK, &vm.view()),
            None => error(StatusCode::NOT_FOUND, format!("no VM named {name}")),
        },
        (&Method::DELETE, ["v1", "vms", name]) => match agent.delete_vm(name).await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({ "deleted": name })),
            Err(e) => agent_error(e),
        },
        (&Method::POST, ["v1", "vms", name, "scsi"]) => {
            let name = name.to_string();
            match body_json::<ScsiPassthrough>(req).await {
                Err(r) => r,
                Ok(p) => scsi(agent, &name, p).await,
            }
        }
        (&Method::POST, ["v1", "vms", name, "migrate"]) => {
            let name = name.to_string();
            match body_json::<MigrateRequest>(req).await {
                Err(r) => r,
                Ok(m) => match agent.migrate(&name, m).await {
                    Ok(view) => json(StatusCode::ACCEPTED, &view),
                    Err(e) => agent_error(e),
                },
            }
        }
        (&Method::GET, ["v1", "migrations"]) => json(StatusCode::OK, &agent.migrations()),
        (&Method::GET, ["v1", "migrations", name]) => match agent.migration(name) {
            Some(m) => json(StatusCode::OK, &m),
            None => error(
                StatusCode::NOT_FOUND,
                format!("no migration of VM {name} from this host"),
            ),
        },
        (_, ["metrics"] | ["v1", "host"] | ["v1", "adapters"] | ["v1", "vms"])
        | (_, ["v1", "migrations"] | ["v1", "migrations", _])
        | (_, ["v1", "vms", _] | ["v1", "vms", _, "scsi" | "migrate"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    };
    tracing::debug!(%method, %path, status = reply.status().as_u16(), "control request");
    reply
}

async fn scsi(agent: &Agent, name: &str, p: ScsiPassthrough) -> Reply {
    let Some(vm) = agent.vm(name) else {
        return error(StatusCode::NOT_FOUND, format!("no VM named {name}"));
    };
    let Some(cdb) = parse_hex(&p.cdb).filter(|c| (6..=260).contains(&c.len())) else {
        return error(StatusCode::BAD_REQUEST, "cdb must be 6 to 260 bytes in hex");
    };
    if p.lun > 16383 {
        return error(StatusCode::BAD_REQUEST, "lun must be 0..=16383");
    }
    let Ok(data) = base64::engine::general_purpose::STANDARD.decode(p.data.as_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "data must be base64");
    };
    if p.read_len > 1 << 20 || data.len() > 1 << 20 {
        return error(StatusCode::BAD_REQUEST, "at most 1 MiB of data each way");
    }
    let command = datapath::Command {
        lun: scsi::lun::encode(p.lun),
        cdb: Bytes::from(cdb),
        data_out: Bytes::from(data),
        read_len: p.read_len,
        attr: datapath::TaskAttr::Simple,
    };
    match vm.submit(command).await {
        Ok(c) => {
            let residual = match c.residual {
                datapath::Residual::None => 0,
                datapath::Residual::Underflow(n) => i64::from(n),
                datapath::Residual::Overflow(n) => -i64::from(n),
            };
            let path = vm.current().map(|cur| cur.describe()).unwrap_or_default();
            json(
                StatusCode::OK,
                &ScsiResult {
                    status: c.status.0,
                    sense: to_hex(&c.sense),
                    data: base64::engine::general_purpose::STANDARD.encode(c.data.to_bytes()),
                    residual,
                    path,
                },
            )
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
