//! The agent's configuration file (TOML).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Configuration files are small; a larger file is a mistake, not a configuration.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The adapter name the software path goes by, so no configured adapter may take it.
const SOFTWARE: &str = "software";

/// One offload adapter the agent may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// How VMs, metrics and the API refer to the adapter: `[a-z0-9_-]+`, not `software`.
    pub name: String,
    /// Unix socket of the (reference) offload adapter's control interface.
    pub socket: PathBuf,
}

/// The host agent's configuration; every field is optional so that an empty file works.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Host name in metrics and the API; default: the machine's hostname.
    pub name: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    /// `host:port` for the Prometheus endpoint, e.g. `127.0.0.1:9410`.
    pub metrics_listen: Option<String>,
    /// Where sysfs is mounted (tests point it at fixture trees); default `/sys`.
    pub sysfs_root: Option<PathBuf>,
    #[serde(default)]
    pub adapters: Vec<AdapterConfig>,
    /// File holding the cluster key shared by the agents a VM may migrate between.
    pub cluster_key: Option<PathBuf>,
    /// `host:port` to accept migrations on (needs `cluster_key`).
    pub migration_listen: Option<String>,
    /// Other agents by name, `name = "host:port"`, for `viscsi migrate VM --to NAME`.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
}

impl HostConfig {
    /// Parses and validates; errors are one line and name the field (or the line) at fault.
    pub fn from_toml(text: &str) -> Result<HostConfig, String> {
        let config: HostConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates `path`; errors start with the path.
    pub fn from_file(path: &Path) -> Result<HostConfig, String> {
        let text = read_limited(path).map_err(|e| format!("{}: {e}", path.display()))?;
        HostConfig::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks what serde cannot: adapter names (unique, `[a-z0-9_-]+`, not `software`),
    /// socket paths present, `metrics_listen` a socket address.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(name) = &self.name {
            if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
                return Err("name: must be 1 to 253 characters without control characters".into());
            }
        }
        for (field, path) in [
            ("state_dir", &self.state_dir),
            ("control_socket", &self.control_socket),
            ("sysfs_root", &self.sysfs_root),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(format!("{field}: must not be empty"));
            }
        }
        if let Some(listen) = &self.metrics_listen {
            listen.parse::<SocketAddr>().map_err(|_| {
                format!("metrics_listen: {listen:?} is not an address:port such as 127.0.0.1:9410")
            })?;
        }
        if self.migration_listen.is_some() && self.cluster_key.is_none() {
            return Err("migration_listen: needs cluster_key (the agents' shared key file)".into());
        }
        if let Some(listen) = &self.migration_listen {
            if !listen.contains(':') {
                return Err(format!("migration_listen: {listen:?} is not host:port"));
            }
        }
        for (name, addr) in &self.peers {
            if name.is_empty() || name.contains([':', '=']) || !addr.contains(':') {
                return Err(format!(
                    "peers: {name:?} = {addr:?} must be a name (without ':' or '=') and host:port"
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, adapter) in self.adapters.iter().enumerate() {
            let name = &adapter.name;
            let problem = if name.is_empty() {
                Some("must not be empty")
            } else if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                Some("may contain only a-z, 0-9, '-' and '_'")
            } else if name == SOFTWARE {
                Some("\"software\" is reserved for the software path")
            } else if !seen.insert(name.as_str()) {
                Some("is used by an earlier adapter")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(format!("adapters[{i}].name: {name:?} {problem}"));
            }
            if adapter.socket.as_os_str().is_empty() {
                return Err(format!("adapters[{i}].socket: must not be empty"));
            }
        }
        Ok(())
    }

    /// The configured host name, else the kernel's hostname, else `localhost`.
    pub fn host_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".to_string())
    }
}

fn read_limited(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())
}

/// toml's messages span several lines (with a source excerpt); keep the position and the
/// message only.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}
