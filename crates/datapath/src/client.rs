//! The initiator client: a VM's iSCSI identity and configuration.
//!
//! The record is data that belongs to the VM: it moves with the VM from host to host and is
//! stored by whichever host agent owns the VM. It is versioned ([`CLIENT_VERSION`]) and
//! checked by [`InitiatorClient::validate`] whenever it is read from a file, the store or the
//! control API, so a bad record is refused with a message naming the field.

use std::path::PathBuf;
use std::time::Duration;

use initiator::url::{parse_portal, read_secret_file};
use initiator::{
    ChapAlgorithm, Credentials, Digest, Identity, Isid, RecoveryPolicy, SessionOptions,
};
use iscsi_proto::initiator::ChapConfig;
use serde::{Deserialize, Serialize};

/// The record version this build writes and reads.
pub const CLIENT_VERSION: u32 = 1;

/// A VM's initiator client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitiatorClient {
    /// Record version ([`CLIENT_VERSION`]).
    pub version: u32,
    /// InitiatorName (`iqn.…`, `eui.…` or `naa.…`), unique per VM.
    pub initiator_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The ISID as 12 hex digits; fixed for the VM's lifetime (a new ISID is a new I_T nexus).
    pub isid: String,
    /// Target portals `host:port`, tried in order.
    pub portals: Vec<String>,
    /// TargetName.
    pub target: String,
    /// LUN numbers the VM uses (empty: every LUN the target reports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub luns: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapSettings>,
    #[serde(default)]
    pub session: SessionSettings,
    #[serde(default)]
    pub recovery: RecoverySettings,
    /// The SPC-4 persistent-reservation key the VM registers with, as 16 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_key: Option<String>,
}

/// CHAP credentials, one-way or mutual.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapSettings {
    pub user: String,
    pub secret: Secret,
    /// For mutual CHAP: the name and secret the target must prove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_secret: Option<Secret>,
}

/// A secret, or where to find it. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Secret {
    /// The secret itself (the agent's store is readable by root only).
    Value(String),
    /// A file holding the secret (one trailing newline is not part of it).
    File(PathBuf),
    /// An environment variable of the process that opens the session.
    Env(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Value(<redacted>)"),
            Secret::File(p) => write!(f, "File({p:?})"),
            Secret::Env(v) => write!(f, "Env({v:?})"),
        }
    }
}

impl Secret {
    /// The secret's bytes. The error names the source, never the value.
    pub fn resolve(&self) -> Result<Vec<u8>, ClientError> {
        match self {
            Secret::Value(v) => Ok(v.as_bytes().to_vec()),
            Secret::File(p) => read_secret_file(p).map_err(|e| {
                ClientError::new(
                    "chap",
                    format!("cannot read secret file {}: {e}", p.display()),
                )
            }),
            Secret::Env(var) => std::env::var(var).map(String::into_bytes).map_err(|_| {
                ClientError::new("chap", format!("environment variable {var} is not set"))
            }),
        }
    }

    /// The same secret with an inline value replaced by `<redacted>` (for display).
    fn redacted(&self) -> Secret {
        match self {
            Secret::Value(_) => Secret::Value("<redacted>".into()),
            other => other.clone(),
        }
    }
}

/// What the session offers in login negotiation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Header digests in preference order: `"none"`, `"crc32c"`.
    pub header_digest: Vec<String>,
    pub data_digest: Vec<String>,
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        let n = initiator::default_negotiation();
        SessionSettings {
            header_digest: vec!["none".into(), "crc32c".into()],
            data_digest: vec!["none".into(), "crc32c".into()],
            max_recv_data_segment_length: n.max_recv_data_segment_length,
            max_burst_length: n.max_burst_length,
            first_burst_length: n.first_burst_length,
            immediate_data: n.immediate_data,
            initial_r2t: n.initial_r2t,
        }
    }
}

/// Timeouts of session recovery, in milliseconds (0: none, where that makes sense).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoverySettings {
    pub connect_timeout_ms: u64,
    pub login_timeout_ms: u64,
    /// Idle time before a NOP-Out ping (0: no pings).
    pub nop_interval_ms: u64,
    pub nop_timeout_ms: u64,
    /// Give up recovering after this long (0: never).
    pub give_up_after_ms: u64,
}

impl Default for RecoverySettings {
    fn default() -> Self {
        let p = RecoveryPolicy::default();
        let ms = |d: Duration| d.as_millis() as u64;
        RecoverySettings {
            connect_timeout_ms: ms(p.connect_timeout),
            login_timeout_ms: ms(p.login_timeout),
            nop_interval_ms: p.nop_interval.map(ms).unwrap_or(0),
            nop_timeout_ms: ms(p.nop_timeout),
            give_up_after_ms: p.give_up_after.map(ms).unwrap_or(0),
        }
    }
}

/// Why a record was refused: the field and the problem, on one line, without secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("initiator client: {field}: {problem}")]
pub struct ClientError {
    pub field: &'static str,
    pub problem: String,
}

impl ClientError {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        ClientError {
            field,
            problem: problem.into(),
        }
    }
}

/// iSCSI names per RFC 7143 §4.2.7: `iqn.YYYY-MM.reversed.domain[:anything]`, `eui.` + 16
/// hex digits, `naa.` + 16 or 32 hex digits; at most 223 bytes, no upper case.
pub fn valid_iscsi_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-:".contains(c);
    if name.len() > 223 || !name.chars().all(allowed) {
        return false;
    }
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit());
    if let Some(rest) = name.strip_prefix("iqn.") {
        let b = rest.as_bytes();
        let date = b.len() >= 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && matches!(
                &rest[5..7],
                "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
            );
        date && b.len() > 8 && b[7] == b'.' && b[8].is_ascii_alphanumeric()
    } else if let Some(rest) = name.strip_prefix("eui.") {
        rest.len() == 16 && hex(rest)
    } else if let Some(rest) = name.strip_prefix("naa.") {
        (rest.len() == 16 || rest.len() == 32) && hex(rest)
    } else {
        false
    }
}

fn parse_digest_list(list: &[String], field: &'static str) -> Result<Vec<Digest>, ClientError> {
    if list.is_empty() {
        return Err(ClientError::new(field, "empty list (use [\"none\"])"));
    }
    list.iter()
        .map(|d| match d.to_ascii_lowercase().as_str() {
            "none" => Ok(Digest::None),
            "crc32c" => Ok(Digest::Crc32c),
            other => Err(ClientError::new(
                field,
                format!("unknown digest {other:?} (none, crc32c)"),
            )),
        })
        .collect()
}

impl InitiatorClient {
    /// A record with a fresh identity for VM `vm_name`: InitiatorName
    /// `iqn.2024-11.org.viscsi:vm.<name>.<8 random hex digits>` (unique across hosts) and a
    /// random-type ISID (RFC 7143 §11.12.5, T = 0b10) that is then fixed.
    pub fn new_for_vm(vm_name: &str, portals: Vec<String>, target: String) -> InitiatorClient {
        let mut r = [0u8; 8];
        // A failing OS random source leaves zeros: names then rely on the VM name only.
        let _ = getrandom::getrandom(&mut r);
        let tag: String = vm_name
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let isid = 0x80u64 << 40 | u64::from_be_bytes(r) & 0x00ff_ffff_ffff;
        InitiatorClient {
            version: CLIENT_VERSION,
            initiator_name: format!(
                "iqn.2024-11.org.viscsi:vm.{tag}.{:08x}",
                u32::from_be_bytes([r[5], r[6], r[7], r[0]])
            ),
            alias: Some(vm_name.to_owned()),
            isid: format!("{isid:012x}"),
            portals,
            target,
            luns: Vec::new(),
            chap: None,
            session: SessionSettings::default(),
            recovery: RecoverySettings::default(),
            reservation_key: None,
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.version != CLIENT_VERSION {
            return Err(ClientError::new(
                "version",
                format!(
                    "version {} is not supported (this build reads {CLIENT_VERSION})",
                    self.version
                ),
            ));
        }
        if !valid_iscsi_name(&self.initiator_name) {
            return Err(ClientError::new(
                "initiator_name",
                format!("{:?} is not an iSCSI name (iqn.YYYY-MM.domain[:id], eui.<16 hex>, naa.<16|32 hex>, lower case)", self.initiator_name),
            ));
        }
        if self
            .alias
            .as_ref()
            .is_some_and(|a| a.len() > 255 || a.contains('\0'))
        {
            return Err(ClientError::new(
                "alias",
                "longer than 255 bytes or contains NUL",
            ));
        }
        let isid = self.isid_value()?;
        if isid >> 46 == 0b11 {
            return Err(ClientError::new(
                "isid",
                "type 0b11 is reserved (RFC 7143 §11.12.5)",
            ));
        }
        if self.portals.is_empty() {
            return Err(ClientError::new("portals", "at least one portal is needed"));
        }
        for p in &self.portals {
            parse_portal(p).map_err(|e| ClientError::new("portals", format!("{p:?}: {e}")))?;
        }
        if !valid_iscsi_name(&self.target) {
            return Err(ClientError::new(
                "target",
                format!("{:?} is not an iSCSI name", self.target),
            ));
        }
        if let Some(l) = self.luns.iter().find(|&&l| l > 16383) {
            return Err(ClientError::new("luns", format!("LUN {l} is above 16383")));
        }
        if let Some(chap) = &self.chap {
            if chap.user.is_empty() || chap.user.len() > 255 {
                return Err(ClientError::new("chap", "user must be 1 to 255 bytes"));
            }
            check_secret(&chap.secret)?;
            match (&chap.target_user, &chap.target_secret) {
                (None, None) => {}
                (Some(u), Some(s)) if !u.is_empty() => check_secret(s)?,
                _ => {
                    return Err(ClientError::new(
                        "chap",
                        "mutual CHAP needs both target_user and target_secret",
                    ))
                }
            }
        }
        let s = &self.session;
        parse_digest_list(&s.header_digest, "session.header_digest")?;
        parse_digest_list(&s.data_digest, "session.data_digest")?;
        let range = 512..=16_777_215;
        for (field, v) in [
            (
                "session.max_recv_data_segment_length",
                s.max_recv_data_segment_length,
            ),
            ("session.max_burst_length", s.max_burst_length),
            ("session.first_burst_length", s.first_burst_length),
        ] {
            if !range.contains(&v) {
                return Err(ClientError::new(
                    field,
                    format!("{v} is outside 512..=16777215"),
                ));
            }
        }
        if s.first_burst_length > s.max_burst_length {
            return Err(ClientError::new(
                "session.first_burst_length",
                "must not exceed max_burst_length",
            ));
        }
        let r = &self.recovery;
        for (field, v) in [
            ("recovery.connect_timeout_ms", r.connect_timeout_ms),
            ("recovery.login_timeout_ms", r.login_timeout_ms),
            ("recovery.nop_timeout_ms", r.nop_timeout_ms),
        ] {
            if v == 0 {
                return Err(ClientError::new(field, "must be above 0"));
            }
        }
        if let Some(k) = &self.reservation_key {
            if k.len() != 16
                || !k.chars().all(|c| c.is_ascii_hexdigit())
                || k.chars().all(|c| c == '0')
            {
                return Err(ClientError::new(
                    "reservation_key",
                    "must be 16 hex digits and not zero",
                ));
            }
        }
        Ok(())
    }

    /// Reads a record from JSON and validates it.
    pub fn from_json(text: &str) -> Result<InitiatorClient, ClientError> {
        let c: InitiatorClient = serde_json::from_str(text)
            .map_err(|e| ClientError::new("record", format!("not a valid record: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// The ISID as a number.
    pub fn isid_value(&self) -> Result<u64, ClientError> {
        if self.isid.len() != 12 || !self.isid.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ClientError::new(
                "isid",
                format!("{:?} is not 12 hex digits", self.isid),
            ));
        }
        u64::from_str_radix(&self.isid, 16).map_err(|e| ClientError::new("isid", e.to_string()))
    }

    /// The reservation key as a number.
    pub fn reservation_key_value(&self) -> Option<u64> {
        self.reservation_key
            .as_deref()
            .and_then(|k| u64::from_str_radix(k, 16).ok())
    }

    /// The initiator port this client logs in as.
    pub fn identity(&self) -> Result<Identity, ClientError> {
        let mut id = Identity::new(self.initiator_name.clone(), Isid(self.isid_value()?));
        id.alias = self.alias.clone();
        Ok(id)
    }

    /// Options for a software-initiator session to `portal` (one of [`Self::portals`]).
    /// Secrets are resolved here, so a missing secret file is reported now.
    pub fn session_options(&self, portal: &str) -> Result<SessionOptions, ClientError> {
        let mut o = SessionOptions::new(self.identity()?, portal, self.target.clone());
        let s = &self.session;
        o.negotiation.header_digest = parse_digest_list(&s.header_digest, "session.header_digest")?;
        o.negotiation.data_digest = parse_digest_list(&s.data_digest, "session.data_digest")?;
        o.negotiation.max_recv_data_segment_length = s.max_recv_data_segment_length;
        o.negotiation.max_burst_length = s.max_burst_length;
        o.negotiation.first_burst_length = s.first_burst_length;
        o.negotiation.immediate_data = s.immediate_data;
        o.negotiation.initial_r2t = s.initial_r2t;
        let r = &self.recovery;
        let ms = Duration::from_millis;
        o.policy.connect_timeout = ms(r.connect_timeout_ms);
        o.policy.login_timeout = ms(r.login_timeout_ms);
        o.policy.nop_interval = (r.nop_interval_ms > 0).then(|| ms(r.nop_interval_ms));
        o.policy.nop_timeout = ms(r.nop_timeout_ms);
        o.policy.give_up_after = (r.give_up_after_ms > 0).then(|| ms(r.give_up_after_ms));
        if let Some(chap) = &self.chap {
            let target = match (&chap.target_user, &chap.target_secret) {
                (Some(u), Some(s)) => Some(Credentials::new(u.clone(), s.resolve()?)),
                _ => None,
            };
            o.chap = Some(ChapConfig {
                credentials: Credentials::new(chap.user.clone(), chap.secret.resolve()?),
                target,
                algorithms: vec![
                    ChapAlgorithm::SHA3_256,
                    ChapAlgorithm::SHA256,
                    ChapAlgorithm::SHA1,
                    ChapAlgorithm::MD5,
                ],
            });
        }
        Ok(o)
    }

    /// The record as it may be shown: inline secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> InitiatorClient {
        let mut c = self.clone();
        if let Some(chap) = &mut c.chap {
            chap.secret = chap.secret.redacted();
            chap.target_secret = chap.target_secret.as_ref().map(Secret::redacted);
        }
        c
    }
}

fn check_secret(s: &Secret) -> Result<(), ClientError> {
    match s {
        Secret::Value(v) if v.is_empty() || v.len() > 255 => {
            Err(ClientError::new("chap", "secret must be 1 to 255 bytes"))
        }
        Secret::File(p) if p.as_os_str().is_empty() => {
            Err(ClientError::new("chap", "empty secret file path"))
        }
        Secret::Env(v) if v.is_empty() => Err(ClientError::new("chap", "empty variable name")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> InitiatorClient {
        InitiatorClient::new_for_vm(
            "Web_1",
            vec!["127.0.0.1:3260".into()],
            "iqn.2024-01.org.viscsi:default".into(),
        )
    }

    #[test]
    fn fresh_identities_are_valid_unique_and_random_type() {
        let a = client();
        let b = client();
        a.validate().unwrap();
        assert!(a
            .initiator_name
            .starts_with("iqn.2024-11.org.viscsi:vm.web-1."));
        assert_ne!(a.initiator_name, b.initiator_name);
        assert_ne!(a.isid, b.isid);
        assert_eq!(a.isid_value().unwrap() >> 46, 0b10, "random-type ISID");
    }

    #[test]
    fn iscsi_names() {
        for good in [
            "iqn.2024-01.org.viscsi:vm1",
            "iqn.1992-08.com.netapp:sn.1234",
            "eui.02004567a425678d",
            "naa.52004567ba64678d",
            "naa.62004567ba64678d0123456789abcdef",
        ] {
            assert!(valid_iscsi_name(good), "{good}");
        }
        for bad in [
            "",
            "iqn",
            "iqn.2024-13.org.x",
            "iqn.24-01.org.x",
            "iqn.2024-01.",
            "IQN.2024-01.org.x",
            "iqn.2024-01.org.X",
            "iqn.2024-01.org.x y",
            "eui.123",
            "naa.xyz0000000000000",
            "foo.bar",
        ] {
            assert!(!valid_iscsi_name(bad), "{bad}");
        }
        assert!(!valid_iscsi_name(&format!(
            "iqn.2024-01.org.{}",
            "a".repeat(220)
        )));
    }

    #[test]
    fn validation_names_the_field() {
        type Breaker = Box<dyn Fn(&mut InitiatorClient)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("version", Box::new(|c| c.version = 9)),
            (
                "initiator_name",
                Box::new(|c| c.initiator_name = "vm1".into()),
            ),
            ("isid", Box::new(|c| c.isid = "12345".into())),
            ("isid", Box::new(|c| c.isid = "c00000000001".into())),
            ("portals", Box::new(|c| c.portals.clear())),
            (
                "portals",
                Box::new(|c| c.portals = vec!["host:99999".into()]),
            ),
            ("target", Box::new(|c| c.target = "disk".into())),
            ("luns", Box::new(|c| c.luns = vec![20000])),
            (
                "session.header_digest",
                Box::new(|c| c.session.header_digest = vec!["md5".into()]),
            ),
            (
                "session.first_burst_length",
                Box::new(|c| c.session.first_burst_length = 1 << 24),
            ),
            (
                "session.max_burst_length",
                Box::new(|c| c.session.max_burst_length = 100),
            ),
            (
                "recovery.login_timeout_ms",
                Box::new(|c| c.recovery.login_timeout_ms = 0),
            ),
            (
                "reservation_key",
                Box::new(|c| c.reservation_key = Some("xyz".into())),
            ),
            (
                "reservation_key",
                Box::new(|c| c.reservation_key = Some("0".repeat(16))),
            ),
            (
                "chap",
                Box::new(|c| {
                    c.chap = Some(ChapSettings {
                        user: "u".into(),
                        secret: Secret::Value(String::new()),
                        target_user: None,
                        target_secret: None,
                    })
                }),
            ),
            (
                "chap",
                Box::new(|c| {
                    c.chap = Some(ChapSettings {
                        user: "u".into(),
                        secret: Secret::Value("s".into()),
                        target_user: Some("t".into()),
                        target_secret: None,
                    })
                }),
            ),
        ];
        for (field, break_it) in cases {
            let mut c = client();
            break_it(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn records_roundtrip_and_secrets_stay_out_of_debug_and_redacted_views() {
        let mut c = client();
        c.chap = Some(ChapSettings {
            user: "vm".into(),
            secret: Secret::Value("s3cr3t-value".into()),
            target_user: Some("tgt".into()),
            target_secret: Some(Secret::Value("other-s3cr3t".into())),
        });
        c.reservation_key = Some("00000000000000ab".into());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(InitiatorClient::from_json(&json).unwrap(), c);
        assert_eq!(c.reservation_key_value(), Some(0xab));
        let shown = format!("{c:?} {}", serde_json::to_string(&c.redacted()).unwrap());
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let toml_text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<InitiatorClient>(&toml_text).unwrap(), c);
    }

    #[test]
    fn bad_records_are_refused_without_echoing_secrets() {
        let e = InitiatorClient::from_json("{\"version\": 1, \"surprise\": 2}").unwrap_err();
        assert_eq!(e.field, "record");
        let e = InitiatorClient::from_json("not json").unwrap_err();
        assert!(
            e.to_string().starts_with("initiator client: record:"),
            "{e}"
        );
        let mut c = client();
        c.chap = Some(ChapSettings {
            user: "vm".into(),
            secret: Secret::File("/nonexistent/secret".into()),
            target_user: None,
            target_secret: None,
        });
        c.validate().unwrap();
        let e = c.session_options("127.0.0.1:3260").unwrap_err();
        assert!(e.problem.contains("/nonexistent/secret"), "{e}");
    }

    #[test]
    fn session_options_carry_identity_negotiation_and_policy() {
        let mut c = client();
        c.session.header_digest = vec!["crc32c".into()];
        c.recovery.nop_interval_ms = 0;
        c.recovery.give_up_after_ms = 30_000;
        c.chap = Some(ChapSettings {
            user: "vm".into(),
            secret: Secret::Value("secretsecret".into()),
            target_user: None,
            target_secret: None,
        });
        let o = c.session_options("127.0.0.1:3260").unwrap();
        assert_eq!(o.identity.initiator_name, c.initiator_name);
        assert_eq!(o.identity.isid.0, c.isid_value().unwrap());
        assert_eq!(o.negotiation.header_digest, vec![Digest::Crc32c]);
        assert_eq!(o.policy.nop_interval, None);
        assert_eq!(o.policy.give_up_after, Some(Duration::from_secs(30)));
        let chap = o.chap.unwrap();
        assert_eq!(chap.credentials.secret.expose(), b"secretsecret");
        assert!(chap.target.is_none());
    }
}
