//! What a user writes to configure the target (TOML or flags), validated into runtime parts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

/// A whole target server: portals and the targets they serve.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Listening addresses (IPv4 or IPv6).
    pub portals: Vec<SocketAddr>,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetDef>,
    /// CHAP required for discovery sessions.
    #[serde(default)]
    pub discovery_chap: Vec<ChapConfig>,
    #[serde(default)]
    pub limits: Limits,
}

/// One iSCSI target and its logical units.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetDef {
    pub iqn: String,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunConfig>,
    /// Initiators that must authenticate with CHAP (any of these credentials).
    #[serde(default)]
    pub chap: Vec<ChapConfig>,
    /// The target's own credentials for mutual CHAP.
    #[serde(default)]
    pub mutual_chap: Option<ChapConfig>,
    /// Initiator names allowed to log in; empty allows all.
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
}

/// A CHAP user and where its secret comes from (exactly one of the three).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    pub user: String,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_env: Option<String>,
}

impl std::fmt::Debug for ChapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapConfig")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ChapConfig {
    /// Reads the secret from wherever it is configured. Errors never contain the secret.
    pub fn resolve_secret(&self) -> Result<Vec<u8>, String> {
        let secret = match (&self.secret, &self.secret_file, &self.secret_env) {
            (Some(s), None, None) => s.clone(),
            (None, Some(p), None) => std::fs::read_to_string(p)
                .map_err(|e| {
                    format!(
                        "CHAP secret file {} for user {}: {e}",
                        p.display(),
                        self.user
                    )
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            (None, None, Some(var)) => std::env::var(var).map_err(|_| {
                format!(
                    "CHAP secret for user {}: environment variable {var} is not set",
                    self.user
                )
            })?,
            _ => {
                return Err(format!(
                    "CHAP user {}: give exactly one of secret, secret_file, secret_env",
                    self.user
                ))
            }
        };
        if secret.is_empty() {
            return Err(format!("CHAP user {}: the secret is empty", self.user));
        }
        Ok(secret.into_bytes())
    }

    /// Parses `USER:SECRET` (a flag value).
    pub fn from_flag(s: &str) -> Result<Self, String> {
        let (user, secret) = s
            .split_once(':')
            .ok_or_else(|| "CHAP credentials must be USER:SECRET".to_string())?;
        if user.is_empty() {
            return Err("CHAP credentials must be USER:SECRET (the user is empty)".into());
        }
        Ok(ChapConfig {
            user: user.into(),
            secret: Some(secret.into()),
            secret_file: None,
            secret_env: None,
        })
    }
}

/// One logical unit.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    pub id: u64,
    /// `mem:SIZE` or `file:PATH` (see [`BackendSpec`]).
    pub backend: String,
    #[serde(default)]
    pub read_only: bool,
    /// Open files with O_DIRECT.
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub block_size: Option<u32>,
    #[serde(default)]
    pub serial: Option<String>,
    /// Size for `file:` back-ends that must be created.
    #[serde(default)]
    pub size: Option<String>,
}

impl LunConfig {
    /// Parses a `--lun ID=BACKEND` flag, e.g. `0=mem:1GiB` or `1=file:/var/lib/disk.img`.
    pub fn from_flag(s: &str) -> Result<Self, String> {
        let (id, backend) = s
            .split_once('=')
            .ok_or_else(|| format!("--lun {s}: expected ID=BACKEND, e.g. 0=mem:1GiB"))?;
        let id = id
            .parse()
            .map_err(|_| format!("--lun {s}: LUN id {id:?} is not a number"))?;
        let lun = LunConfig {
            id,
            backend: backend.into(),
            read_only: false,
            direct: false,
            block_size: None,
            serial: None,
            size: None,
        };
        lun.spec()?;
        Ok(lun)
    }

    pub fn spec(&self) -> Result<BackendSpec, String> {
        self.backend.parse()
    }
}

/// A parsed back-end description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    Memory { size: u64 },
    File { path: PathBuf },
}

impl FromStr for BackendSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("mem", size)) => Ok(BackendSpec::Memory {
                size: parse_size(size)?,
            }),
            Some(("file", path)) if !path.is_empty() => Ok(BackendSpec::File { path: path.into() }),
            _ => Err(format!("back-end {s:?}: expected mem:SIZE or file:PATH")),
        }
    }
}

/// Parses sizes such as `512`, `64MiB`, `1GiB`, `1G`, `4k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => return Err(format!("size {s:?}: unknown unit {other:?}")),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("size {s:?} must not be zero"));
    }
    Ok(bytes)
}

/// Negotiation limits and timers, with RFC-friendly defaults tuned for throughput.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u16,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Offer CRC32C digests (the initiator's preference order decides).
    pub digests: bool,
    pub command_window: u32,
    /// Seconds of idle time before a NOP-In ping; 0 disables.
    pub nop_in_interval_secs: u64,
    pub nop_in_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: false,
            digests: true,
            command_window: 128,
            nop_in_interval_secs: 30,
            nop_in_timeout_secs: 30,
        }
    }
}

impl TargetConfig {
    /// Reads a TOML file; errors name the file and the problem.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }

    /// Checks what serde cannot: names, duplicate LUNs, back-end strings, secrets.
    pub fn validate(&self) -> Result<(), String> {
        if self.portals.is_empty() {
            return Err("no portal to listen on (give --portal ADDR:PORT)".into());
        }
        if self.targets.is_empty() {
            return Err("no target defined (give --iqn and --lun)".into());
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.targets {
            if !valid_iscsi_name(&t.iqn) {
                return Err(format!(
                    "target name {:?} is not an iqn., eui. or naa. name",
                    t.iqn
                ));
            }
            if !names.insert(t.iqn.to_ascii_lowercase()) {
                return Err(format!("target {} is defined twice", t.iqn));
            }
            if t.luns.is_empty() {
                return Err(format!("target {} has no LUN", t.iqn));
            }
            let mut ids = std::collections::HashSet::new();
            for l in &t.luns {
                if l.id >= 16384 {
                    return Err(format!(
                        "target {}: LUN {} is out of range (0..16383)",
                        t.iqn, l.id
                    ));
                }
                if !ids.insert(l.id) {
                    return Err(format!("target {}: LUN {} is defined twice", t.iqn, l.id));
                }
                l.spec()
                    .map_err(|e| format!("target {} LUN {}: {e}", t.iqn, l.id))?;
                if let Some(bs) = l.block_size {
                    if bs != 512 && bs != 4096 {
                        return Err(format!(
                            "target {} LUN {}: block size must be 512 or 4096",
                            t.iqn, l.id
                        ));
                    }
                }
            }
            for c in t
                .chap
                .iter()
                .chain(&t.mutual_chap)
                .chain(&self.discovery_chap)
            {
                c.resolve_secret()?;
            }
            if t.mutual_chap.is_some() && t.chap.is_empty() {
                return Err(format!(
                    "target {}: mutual CHAP needs initiator CHAP too (--chap)",
                    t.iqn
                ));
            }
        }
        let l = &self.limits;
        if !(512..=16_777_215).contains(&l.max_recv_data_segment_length) {
            return Err("max_recv_data_segment_length must be within 512..16777215".into());
        }
        if !(512..=16_777_215).contains(&l.max_burst_length)
            || !(512..=l.max_burst_length).contains(&l.first_burst_length)
        {
            return Err("burst lengths must be within 512..16777215 and first_burst_length <= max_burst_length".into());
        }
        if l.max_outstanding_r2t == 0 || l.command_window == 0 || l.command_window > 4096 {
            return Err(
                "max_outstanding_r2t must be >= 1 and command_window within 1..4096".into(),
            );
        }
        Ok(())
    }
}

/// iSCSI names per RFC 7143 §4.2.7: `iqn.`, `eui.` or `naa.` prefixes, at most 223 bytes.
pub fn valid_iscsi_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.len() <= 223
        && (lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa."))
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn lun_flags() {
        let l = LunConfig::from_flag("1=file:/tmp/x.img").unwrap();
        assert_eq!(
            l.spec(),
            Ok(BackendSpec::File {
                path: "/tmp/x.img".into()
            })
        );
        assert!(LunConfig::from_flag("x=mem:1G").is_err());
        assert!(LunConfig::from_flag("0=nbd:foo").is_err());
    }

    #[test]
    fn chap_debug_hides_secret() {
        let c = ChapConfig::from_flag("user:verysecret123").unwrap();
        assert!(!format!("{c:?}").contains("verysecret"));
    }

    #[test]
    fn toml_is_strict() {
        let bad = "portals = [\"127.0.0.1:3260\"]\nbogus = 1\n";
        assert!(toml::from_str::<TargetConfig>(bad).is_err());
        let good = r#"
portals = ["127.0.0.1:3260", "[::1]:3260"]
[[target]]
iqn = "iqn.2024-01.org.viscsi:disk"
[[target.lun]]
id = 0
backend = "mem:64MiB"
"#;
        let cfg: TargetConfig = toml::from_str(good).unwrap();
        cfg.validate().unwrap();
    }
}
