//! libiscsi-style `iscsi://` URLs, the way people already name iSCSI LUNs to QEMU and libiscsi's
//! tools.
//!
//! ```text
//! iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN[?KEY=VALUE[&KEY=VALUE]...]
//! iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN      (a target without a LUN, e.g. to list it)
//! iscsi://[USER[%PASSWORD]@]HOST[:PORT]/                (a portal only, for discovery)
//! ```
//!
//! HOST is a name, an IPv4 address or a bracketed IPv6 address (`[::1]`); PORT defaults to 3260.
//! The query keys are `target_user` and `target_password` (mutual CHAP: the credentials the
//! target must prove), and `header_digest` / `data_digest` with the values `none`, `crc32c`,
//! `crc32c-none` or `none-crc32c` (the digests offered, in preference order). Any other key is
//! an error, as are keys given twice.
//!
//! How the text is split, and what is decoded (the rules libiscsi follows, plus a few that make
//! URLs it would misread usable):
//!
//! 1. The query starts at the first `?`, so a password written in the URL cannot contain `?`
//!    (a URL that looks like that is refused, without echoing any of it).
//! 2. The user part ends at the last `@` before the query (host, target and LUN never contain
//!    `@`, so a password may). Within it, the first `%` separates user and password, as in
//!    libiscsi. User and password are taken **literally**: `%` is the separator there, so it
//!    cannot also start an escape (a password may contain further `%` characters, `/` and `@`).
//! 3. Query values and the target name are percent-decoded (`%2F` is `/`, `%25` is `%`; `+` is a
//!    plus sign, not a space); a `%` not followed by two hex digits is an error. IQNs never
//!    contain `%`, so decoding changes no ordinary target name.
//!
//! A URL may name a user without a password; the secrets then come from the environment
//! ([`IscsiUrl::fill_secrets_from_env`]) or from files ([`read_secret_file`],
//! [`IscsiUrl::set_secret`]). Until then the missing parts are empty strings in the
//! [`ChapConfig`], and [`IscsiUrl::check_credentials`] says what is missing.
//!
//! Error messages never contain a password, and [`IscsiUrl`]'s `Display` writes `%***` in its
//! place (and `target_password=***`).

use std::fmt;
use std::net::Ipv6Addr;
use std::path::Path;
use std::str::FromStr;

use crate::{ChapConfig, Credentials, Digest};

/// The iSCSI port when a URL names none.
pub const DEFAULT_PORT: u16 = 3260;

/// The highest LUN number the 14-bit flat addressing method can carry.
pub const MAX_LUN: u64 = 16383;

/// The initiator's CHAP secret (viscsi's name).
pub const ENV_CHAP_PASSWORD: &str = "VISCSI_CHAP_PASSWORD";
/// The secret the target must prove for mutual CHAP (viscsi's name).
pub const ENV_CHAP_TARGET_PASSWORD: &str = "VISCSI_CHAP_TARGET_PASSWORD";
/// libiscsi's names for the same things, accepted after viscsi's.
pub const LIBISCSI_ENV_CHAP_PASSWORD: &str = "LIBISCSI_CHAP_PASSWORD";
pub const LIBISCSI_ENV_CHAP_TARGET_USERNAME: &str = "LIBISCSI_CHAP_TARGET_USERNAME";
pub const LIBISCSI_ENV_CHAP_TARGET_PASSWORD: &str = "LIBISCSI_CHAP_TARGET_PASSWORD";

/// A parsed `iscsi://` URL.
#[derive(Clone, Debug)]
pub struct IscsiUrl {
    /// `host:port`, with `[..]` around an IPv6 address; the port is always present.
    pub portal: String,
    /// The target name, if the URL has one.
    pub target: Option<String>,
    /// The LUN number, if the URL has one (only with a target).
    pub lun: Option<u64>,
    /// CHAP credentials. An empty user or secret means "not given yet" (see the module docs).
    pub chap: Option<ChapConfig>,
    /// Header digests to offer, in preference order (None: the library's default).
    pub header_digest: Option<Vec<Digest>>,
    /// Data digests to offer, in preference order (None: the library's default).
    pub data_digest: Option<Vec<Digest>>,
}

/// Why a URL (or a secret for it) was refused. Messages fit on one line and never contain a
/// password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    #[error("not an iSCSI URL: it must start with iscsi://")]
    MissingScheme,
    #[error("no host in the URL")]
    MissingHost,
    #[error("bad host in the URL: {0}")]
    BadHost(&'static str),
    #[error("bad port in the URL: it must be a number from 1 to 65535")]
    BadPort,
    #[error("empty CHAP user name before '%' in the URL")]
    EmptyUser,
    #[error("empty CHAP password after '%' in the URL")]
    EmptyPassword,
    #[error(
        "'?' before '@' in the URL: a password in the URL cannot contain '?' \
         (use a secret file or {ENV_CHAP_PASSWORD})"
    )]
    QuestionMarkInPassword,
    #[error("empty target name in the URL")]
    EmptyTarget,
    #[error("bad LUN in the URL: it must be a whole number from 0 to {MAX_LUN}")]
    BadLun,
    #[error("unexpected text after the LUN in the URL")]
    TrailingPath,
    #[error("bad percent-encoding in the {0} of the URL")]
    BadPercentEncoding(&'static str),
    #[error("the {0} in the URL is not UTF-8")]
    NotUtf8(&'static str),
    #[error(
        "unknown URL argument {0} (known: target_user, target_password, header_digest, data_digest)"
    )]
    UnknownKey(String),
    #[error("URL argument {0} has no '=VALUE'")]
    MissingValue(String),
    #[error("URL argument {0} given twice")]
    DuplicateKey(String),
    #[error("bad {0}: expected none, crc32c, crc32c-none or none-crc32c")]
    BadDigest(&'static str),
    #[error("empty {0} in the URL")]
    EmptyValue(&'static str),
    #[error("no CHAP password for user {0}: put it in the URL as USER%PASSWORD@, or give a secret file or {ENV_CHAP_PASSWORD}")]
    MissingSecret(String),
    #[error("no password for the target's CHAP user {0}: give target_password, a target secret file or {ENV_CHAP_TARGET_PASSWORD}")]
    MissingTargetSecret(String),
    #[error("a target CHAP password without a target user name: give target_user (or {LIBISCSI_ENV_CHAP_TARGET_USERNAME})")]
    MissingTargetUser,
    #[error(
        "mutual CHAP (target_user) needs a CHAP user for the initiator too (USER@ in the URL)"
    )]
    MutualWithoutUser,
    #[error("a CHAP secret for a URL without a CHAP user: put USER@ in the URL")]
    SecretWithoutUser,
    #[error("a target CHAP secret for a URL without target_user")]
    TargetSecretWithoutUser,
    #[error("the CHAP password is given twice (in the URL and elsewhere)")]
    SecretGivenTwice,
    #[error("the target's CHAP password is given twice (in the URL and elsewhere)")]
    TargetSecretGivenTwice,
    #[error("two different CHAP user names (in the URL and a flag)")]
    UserGivenTwice,
    #[error("two different target CHAP user names (in the URL and a flag)")]
    TargetUserGivenTwice,
    #[error("empty CHAP secret")]
    EmptySecret,
    #[error("the URL names no target: expected iscsi://HOST[:PORT]/TARGET-IQN/LUN")]
    NeedTarget,
    #[error("the URL names no LUN: expected iscsi://HOST[:PORT]/TARGET-IQN/LUN")]
    NeedLun,
}

/// Shows `s` in a message only if it is short and plainly not part of a secret (letters,
/// digits, `_`, `-`, `.`); otherwise a placeholder.
fn shown(s: &str) -> String {
    let plain = !s.is_empty()
        && s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if plain {
        s.to_owned()
    } else {
        "(not shown)".to_owned()
    }
}

/// `%XX` decoding; `None` on a `%` without two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn decode_text(s: &str, what: &'static str) -> Result<String, UrlError> {
    let bytes = percent_decode(s).ok_or(UrlError::BadPercentEncoding(what))?;
    String::from_utf8(bytes).map_err(|_| UrlError::NotUtf8(what))
}

/// Escapes what would not survive [`IscsiUrl::from_str`] in a target name or query value.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep =
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'~' | b',');
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses a digest preference list: `none`, `crc32c`, `crc32c-none` or `none-crc32c`
/// (case-insensitive; `,` may separate instead of `-`). `what` names the setting in errors.
pub fn parse_digests(value: &str, what: &'static str) -> Result<Vec<Digest>, UrlError> {
    let mut list = Vec::new();
    for part in value.split(['-', ',']) {
        let digest = match part.to_ascii_lowercase().as_str() {
            "none" => Digest::None,
            "crc32c" => Digest::Crc32c,
            _ => return Err(UrlError::BadDigest(what)),
        };
        if list.contains(&digest) {
            return Err(UrlError::BadDigest(what));
        }
        list.push(digest);
    }
    Ok(list)
}

/// The URL spelling of a digest list (`crc32c-none`).
pub fn digests_to_string(list: &[Digest]) -> String {
    list.iter()
        .map(|d| match d {
            Digest::None => "none",
            Digest::Crc32c => "crc32c",
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Reads a secret from a file; one trailing line end (`\n` or `\r\n`) is not part of it.
pub fn read_secret_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    Ok(bytes)
}

/// `HOST[:PORT]` of a URL (or of a bare portal argument) as `host:port` / `[v6]:port`.
pub fn parse_portal(hostport: &str) -> Result<String, UrlError> {
    if hostport.is_empty() {
        return Err(UrlError::MissingHost);
    }
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or(UrlError::BadHost("'[' without ']'"))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| UrlError::BadHost("not an IPv6 address inside [ ]"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or(UrlError::BadHost("text after ']'"))?,
            ),
        };
        (format!("[{addr}]"), port)
    } else {
        let (host, port) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        if port.is_some_and(|p| p.contains(':')) {
            return Err(UrlError::BadHost(
                "an IPv6 address needs brackets, e.g. [::1]:3260",
            ));
        }
        if host.is_empty() {
            return Err(UrlError::MissingHost);
        }
        let plain = host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !plain {
            return Err(UrlError::BadHost(
                "only letters, digits, '.', '-' and '_' are allowed",
            ));
        }
        (host.to_owned(), port)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => parse_port(p)?,
    };
    Ok(format!("{host}:{port}"))
}

fn parse_port(p: &str) -> Result<u16, UrlError> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UrlError::BadPort);
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(UrlError::BadPort),
        Ok(port) => Ok(port),
    }
}

fn parse_lun(s: &str) -> Result<u64, UrlError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UrlError::BadLun);
    }
    match s.parse::<u64>() {
        Ok(lun) if lun <= MAX_LUN => Ok(lun),
        _ => Err(UrlError::BadLun),
    }
}

/// Whether `s` starts with the `iscsi://` scheme (any case).
pub fn is_iscsi_url(s: &str) -> bool {
    s.get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("iscsi://"))
}

/// What the query carried, before it is merged with the user part.
#[derive(Default)]
struct Query {
    target_user: Option<String>,
    target_password: Option<Vec<u8>>,
    header_digest: Option<Vec<Digest>>,
    data_digest: Option<Vec<Digest>>,
}

fn parse_query(query: &str) -> Result<Query, UrlError> {
    let mut q = Query::default();
    for arg in query.split('&').filter(|a| !a.is_empty()) {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(UrlError::MissingValue(shown(arg)));
        };
        let duplicate = || UrlError::DuplicateKey(key.to_owned());
        match key {
            "target_user" => {
                let user = decode_text(value, "target_user")?;
                if user.is_empty() {
                    return Err(UrlError::EmptyValue("target_user"));
                }
                if q.target_user.replace(user).is_some() {
                    return Err(duplicate());
                }
            }
            "target_password" => {
                let secret =
                    percent_decode(value).ok_or(UrlError::BadPercentEncoding("target_password"))?;
                if secret.is_empty() {
                    return Err(UrlError::EmptyValue("target_password"));
                }
                if q.target_password.replace(secret).is_some() {
                    return Err(duplicate());
                }
            }
            "header_digest" => {
                let list = parse_digests(&decode_text(value, "header_digest")?, "header_digest")?;
                if q.header_digest.replace(list).is_some() {
                    return Err(duplicate());
                }
            }
            "data_digest" => {
                let list = parse_digests(&decode_text(value, "data_digest")?, "data_digest")?;
                if q.data_digest.replace(list).is_some() {
                    return Err(duplicate());
                }
            }
            other => return Err(UrlError::UnknownKey(shown(other))),
        }
    }
    Ok(q)
}

impl FromStr for IscsiUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        if !is_iscsi_url(s) {
            return Err(UrlError::MissingScheme);
        }
        let rest = &s[8..];
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        // "iscsi://user%pa?ss@host/..." would otherwise put part of a password in the query.
        if query.is_some_and(|q| q.contains('@'))
            && !before_query.contains('@')
            && !before_query.contains('/')
        {
            return Err(UrlError::QuestionMarkInPassword);
        }
        let (userinfo, location) = match before_query.rsplit_once('@') {
            Some((u, l)) => (Some(u), l),
            None => (None, before_query),
        };
        let (hostport, path) = match location.split_once('/') {
            Some((h, p)) => (h, Some(p)),
            None => (location, None),
        };
        let portal = parse_portal(hostport)?;

        let mut target = None;
        let mut lun = None;
        if let Some(path) = path {
            let mut parts = path.splitn(3, '/');
            let name = parts.next().unwrap_or_default();
            let lun_text = parts.next();
            if parts.next().is_some() {
                return Err(UrlError::TrailingPath);
            }
            if !name.is_empty() {
                target = Some(decode_text(name, "target name")?);
            } else if lun_text.is_some() {
                return Err(UrlError::EmptyTarget);
            }
            match lun_text {
                None | Some("") => {}
                Some(text) => lun = Some(parse_lun(text)?),
            }
        }

        let query = match query {
            Some(q) => parse_query(q)?,
            None => Query::default(),
        };

        let mut chap = None;
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once('%') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if user.is_empty() {
                return Err(UrlError::EmptyUser);
            }
            if password == Some("") {
                return Err(UrlError::EmptyPassword);
            }
            chap = Some(ChapConfig {
                credentials: Credentials::new(user, password.unwrap_or_default().as_bytes()),
                target: None,
                algorithms: Vec::new(),
            });
        }
        if query.target_user.is_some() || query.target_password.is_some() {
            let Some(c) = chap.as_mut() else {
                return Err(UrlError::MutualWithoutUser);
            };
            c.target = Some(Credentials::new(
                query.target_user.unwrap_or_default(),
                query.target_password.unwrap_or_default(),
            ));
        }

        Ok(IscsiUrl {
            portal,
            target,
            lun,
            chap,
            header_digest: query.header_digest,
            data_digest: query.data_digest,
        })
    }
}

impl IscsiUrl {
    /// A URL for a portal alone (`host[:port]`, port 3260 if absent).
    pub fn portal_only(hostport: &str) -> Result<IscsiUrl, UrlError> {
        Ok(IscsiUrl {
            portal: parse_portal(hostport)?,
            target: None,
            lun: None,
            chap: None,
            header_digest: None,
            data_digest: None,
        })
    }

    /// The target name, or an error for a URL without one.
    pub fn require_target(&self) -> Result<&str, UrlError> {
        self.target.as_deref().ok_or(UrlError::NeedTarget)
    }

    /// Target and LUN, or an error for a URL without both.
    pub fn require_lun(&self) -> Result<(&str, u64), UrlError> {
        let target = self.require_target()?;
        Ok((target, self.lun.ok_or(UrlError::NeedLun)?))
    }

    /// Fills the secrets the URL left out from the environment ([`ENV_CHAP_PASSWORD`], then
    /// [`LIBISCSI_ENV_CHAP_PASSWORD`]; [`ENV_CHAP_TARGET_PASSWORD`], then
    /// [`LIBISCSI_ENV_CHAP_TARGET_PASSWORD`]; the target's user from
    /// [`LIBISCSI_ENV_CHAP_TARGET_USERNAME`]). Never replaces what the URL says; empty
    /// variables count as unset.
    pub fn fill_secrets_from_env(&mut self) {
        self.fill_secrets_from(|name| std::env::var(name).ok());
    }

    /// [`fill_secrets_from_env`](Self::fill_secrets_from_env) with any lookup (for tests).
    pub fn fill_secrets_from(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        let get = |names: &[&str]| {
            names
                .iter()
                .filter_map(|n| lookup(n))
                .find(|v| !v.is_empty())
        };
        let Some(chap) = self.chap.as_mut() else {
            return;
        };
        if chap.credentials.secret.is_empty() {
            if let Some(secret) = get(&[ENV_CHAP_PASSWORD, LIBISCSI_ENV_CHAP_PASSWORD]) {
                chap.credentials = Credentials::new(chap.credentials.user.clone(), secret);
            }
        }
        if chap.target.is_none() {
            if let Some(user) = get(&[LIBISCSI_ENV_CHAP_TARGET_USERNAME]) {
                chap.target = Some(Credentials::new(user, Vec::new()));
            }
        }
        if let Some(target) = chap.target.as_mut() {
            if target.user.is_empty() {
                if let Some(user) = get(&[LIBISCSI_ENV_CHAP_TARGET_USERNAME]) {
                    target.user = user;
                }
            }
            if target.secret.is_empty() {
                let names = [ENV_CHAP_TARGET_PASSWORD, LIBISCSI_ENV_CHAP_TARGET_PASSWORD];
                if let Some(secret) = get(&names) {
                    *target = Credentials::new(target.user.clone(), secret);
                }
            }
        }
    }

    /// Sets the initiator's CHAP user when the URL has none (e.g. from a `--chap-user` flag).
    /// A different user in the URL is an error.
    pub fn set_user(&mut self, user: &str) -> Result<(), UrlError> {
        if user.is_empty() {
            return Err(UrlError::EmptyUser);
        }
        match self.chap.as_mut() {
            Some(c) if c.credentials.user.is_empty() => {
                c.credentials.user = user.to_owned();
                Ok(())
            }
            Some(c) if c.credentials.user == user => Ok(()),
            Some(_) => Err(UrlError::UserGivenTwice),
            None => {
                self.chap = Some(ChapConfig {
                    credentials: Credentials::new(user, Vec::new()),
                    target: None,
                    algorithms: Vec::new(),
                });
                Ok(())
            }
        }
    }

    /// Sets the target's CHAP user for mutual CHAP when the URL has none (`--target-chap-user`).
    pub fn set_target_user(&mut self, user: &str) -> Result<(), UrlError> {
        if user.is_empty() {
            return Err(UrlError::EmptyValue("target CHAP user"));
        }
        let chap = self.chap.as_mut().ok_or(UrlError::MutualWithoutUser)?;
        match chap.target.as_mut() {
            Some(t) if t.user.is_empty() || t.user == user => {
                t.user = user.to_owned();
                Ok(())
            }
            Some(_) => Err(UrlError::TargetUserGivenTwice),
            None => {
                chap.target = Some(Credentials::new(user, Vec::new()));
                Ok(())
            }
        }
    }

    /// Sets the initiator's CHAP secret (e.g. read from a file). The URL must name the user
    /// and must not carry a password already.
    pub fn set_secret(&mut self, secret: Vec<u8>) -> Result<(), UrlError> {
        if secret.is_empty() {
            return Err(UrlError::EmptySecret);
        }
        let chap = self.chap.as_mut().ok_or(UrlError::SecretWithoutUser)?;
        if !chap.credentials.secret.is_empty() {
            return Err(UrlError::SecretGivenTwice);
        }
        chap.credentials = Credentials::new(chap.credentials.user.clone(), secret);
        Ok(())
    }

    /// Sets the secret the target must prove (mutual CHAP); the target's user must be known.
    pub fn set_target_secret(&mut self, secret: Vec<u8>) -> Result<(), UrlError> {
        if secret.is_empty() {
            return Err(UrlError::EmptySecret);
        }
        let target = self
            .chap
            .as_mut()
            .and_then(|c| c.target.as_mut())
            .ok_or(UrlError::TargetSecretWithoutUser)?;
        if !target.secret.is_empty() {
            return Err(UrlError::TargetSecretGivenTwice);
        }
        *target = Credentials::new(target.user.clone(), secret);
        Ok(())
    }

    /// Every CHAP user has a secret and every secret a user: ready to log in.
    pub fn check_credentials(&self) -> Result<(), UrlError> {
        let Some(chap) = &self.chap else {
            return Ok(());
        };
        if chap.credentials.user.is_empty() {
            return Err(UrlError::MutualWithoutUser);
        }
        if chap.credentials.secret.is_empty() {
            return Err(UrlError::MissingSecret(chap.credentials.user.clone()));
        }
        if let Some(t) = &chap.target {
            if t.user.is_empty() {
                return Err(UrlError::MissingTargetUser);
            }
            if t.secret.is_empty() {
                return Err(UrlError::MissingTargetSecret(t.user.clone()));
            }
        }
        Ok(())
    }
}

/// The URL with every password replaced by `***`; parses back to the same URL but for them.
impl fmt::Display for IscsiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("iscsi://")?;
        if let Some(chap) = &self.chap {
            f.write_str(&chap.credentials.user)?;
            if !chap.credentials.secret.is_empty() {
                f.write_str("%***")?;
            }
            f.write_str("@")?;
        }
        write!(f, "{}/", self.portal)?;
        if let Some(target) = &self.target {
            f.write_str(&percent_encode(target))?;
            if let Some(lun) = self.lun {
                write!(f, "/{lun}")?;
            }
        }
        let mut args: Vec<String> = Vec::new();
        if let Some(t) = self.chap.as_ref().and_then(|c| c.target.as_ref()) {
            if !t.user.is_empty() {
                args.push(format!("target_user={}", percent_encode(&t.user)));
            }
            if !t.secret.is_empty() {
                args.push("target_password=***".to_owned());
            }
        }
        if let Some(d) = &self.header_digest {
            args.push(format!("header_digest={}", digests_to_string(d)));
        }
        if let Some(d) = &self.data_digest {
            args.push(format!("data_digest={}", digests_to_string(d)));
        }
        if !args.is_empty() {
            write!(f, "?{}", args.join("&"))?;
        }
        Ok(())
    }
}

/// Replaces the passwords of every `iscsi://` URL inside `text` by `***` (for messages that
/// may quote a command line, e.g. from an argument parser). Tokens end at whitespace or quotes.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = find_scheme(rest) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '`'))
            .unwrap_or(tail.len());
        out.push_str(&redact_one(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn find_scheme(s: &str) -> Option<usize> {
    s.char_indices()
        .map(|(i, _)| i)
        .find(|&i| is_iscsi_url(&s[i..]))
}

/// One URL token with its passwords hidden, even when it does not parse.
fn redact_one(token: &str) -> String {
    if let Ok(url) = token.parse::<IscsiUrl>() {
        return url.to_string();
    }
    // Unparseable: hide everything between the first '%' of the user part and its '@', and
    // every target_password value.
    let (before_query, query) = match token.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (token, None),
    };
    let mut out = match before_query.rsplit_once('@') {
        Some((userinfo, location)) => match userinfo.split_once('%') {
            Some((user, _)) => format!("{user}%***@{location}"),
            None => before_query.to_owned(),
        },
        // No '@': anything after a '%' might be a password (e.g. a '?' inside one).
        None => match before_query.split_once('%') {
            Some((head, _)) => format!("{head}%***"),
            None => before_query.to_owned(),
        },
    };
    if let Some(q) = query {
        if !before_query.contains('@') && before_query.contains('%') {
            return out;
        }
        let args: Vec<String> = q
            .split('&')
            .map(|a| match a.split_once('=') {
                Some(("target_password", _)) => "target_password=***".to_owned(),
                _ => a.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&args.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> IscsiUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> UrlError {
        match s.parse::<IscsiUrl>() {
            Ok(u) => panic!("{s} parsed as {u}"),
            Err(e) => e,
        }
    }

    fn secret(c: &Credentials) -> &[u8] {
        c.secret.expose()
    }

    #[test]
    fn full_url_with_lun() {
        let u = parse("iscsi://10.0.0.1:3261/iqn.2024-01.org.example:disk1/3");
        assert_eq!(u.portal, "10.0.0.1:3261");
        assert_eq!(u.target.as_deref(), Some("iqn.2024-01.org.example:disk1"));
        assert_eq!(u.lun, Some(3));
        assert!(u.chap.is_none());
        assert_eq!(
            u.require_lun().unwrap(),
            ("iqn.2024-01.org.example:disk1", 3)
        );
    }

    #[test]
    fn default_port_and_scheme_case() {
        let u = parse("ISCSI://host.example/iqn.a:b/0");
        assert_eq!(u.portal, "host.example:3260");
        assert_eq!(u.lun, Some(0));
    }

    #[test]
    fn ipv6_with_and_without_port() {
        assert_eq!(parse("iscsi://[::1]:3262/iqn.a/1").portal, "[::1]:3262");
        assert_eq!(parse("iscsi://[fe80::1]/iqn.a/1").portal, "[fe80::1]:3260");
        assert_eq!(parse("iscsi://[::1]/").portal, "[::1]:3260");
        assert!(matches!(err("iscsi://::1/iqn.a/0"), UrlError::BadHost(_)));
        assert!(matches!(err("iscsi://[::1/iqn.a/0"), UrlError::BadHost(_)));
        assert!(matches!(
            err("iscsi://[nothex]/iqn.a/0"),
            UrlError::BadHost(_)
        ));
        assert!(matches!(
            err("iscsi://[::1]x/iqn.a/0"),
            UrlError::BadHost(_)
        ));
    }

    #[test]
    fn portal_only_and_target_only_forms() {
        for s in ["iscsi://h:1234/", "iscsi://h:1234"] {
            let u = parse(s);
            assert_eq!(u.portal, "h:1234");
            assert_eq!(u.target, None);
            assert_eq!(u.lun, None);
            assert_eq!(u.require_target(), Err(UrlError::NeedTarget));
        }
        for s in ["iscsi://h/iqn.x:y", "iscsi://h/iqn.x:y/"] {
            let u = parse(s);
            assert_eq!(u.target.as_deref(), Some("iqn.x:y"));
            assert_eq!(u.lun, None);
            assert_eq!(u.require_lun(), Err(UrlError::NeedLun));
        }
    }

    #[test]
    fn bad_lun_port_host_and_path() {
        assert_eq!(err("iscsi://h/iqn.a/x"), UrlError::BadLun);
        assert_eq!(err("iscsi://h/iqn.a/-1"), UrlError::BadLun);
        assert_eq!(err("iscsi://h/iqn.a/16384"), UrlError::BadLun);
        assert_eq!(
            err("iscsi://h/iqn.a/99999999999999999999999"),
            UrlError::BadLun
        );
        assert_eq!(parse("iscsi://h/iqn.a/16383").lun, Some(16383));
        assert_eq!(err("iscsi://h:0/iqn.a/0"), UrlError::BadPort);
        assert_eq!(err("iscsi://h:65536/iqn.a/0"), UrlError::BadPort);
        assert_eq!(err("iscsi://h:http/iqn.a/0"), UrlError::BadPort);
        assert_eq!(err("iscsi://h:/iqn.a/0"), UrlError::BadPort);
        assert_eq!(err("iscsi://h:+80/iqn.a/0"), UrlError::BadPort);
        assert_eq!(err("iscsi:///iqn.a/0"), UrlError::MissingHost);
        assert_eq!(err("iscsi://:3260/iqn.a/0"), UrlError::MissingHost);
        assert!(matches!(err("iscsi://h st/iqn.a/0"), UrlError::BadHost(_)));
        assert_eq!(err("iscsi://h//0"), UrlError::EmptyTarget);
        assert_eq!(err("iscsi://h/iqn.a/0/extra"), UrlError::TrailingPath);
        assert_eq!(err("http://h/iqn.a/0"), UrlError::MissingScheme);
        assert_eq!(err("h:3260"), UrlError::MissingScheme);
        assert_eq!(err(""), UrlError::MissingScheme);
    }

    #[test]
    fn user_and_password_split_at_the_first_percent() {
        let u = parse("iscsi://alice%s3cr%et@w/rd@h/iqn.a/0");
        let c = u.chap.as_ref().unwrap();
        assert_eq!(c.credentials.user, "alice");
        assert_eq!(secret(&c.credentials), b"s3cr%et@w/rd");
        assert_eq!(u.portal, "h:3260");
        assert!(c.target.is_none());
        u.check_credentials().unwrap();
    }

    #[test]
    fn user_without_password_waits_for_a_secret() {
        let u = parse("iscsi://bob@h/iqn.a/0");
        let c = u.chap.as_ref().unwrap();
        assert_eq!(c.credentials.user, "bob");
        assert!(c.credentials.secret.is_empty());
        assert_eq!(
            u.check_credentials(),
            Err(UrlError::MissingSecret("bob".into()))
        );
        assert_eq!(err("iscsi://%pw@h/iqn.a/0"), UrlError::EmptyUser);
        assert_eq!(err("iscsi://bob%@h/iqn.a/0"), UrlError::EmptyPassword);
    }

    #[test]
    fn query_arguments_mutual_chap_and_digests() {
        let u = parse(
            "iscsi://u%p@h/iqn.a/0?target_user=tu&target_password=a%26b%25c%3D&header_digest=crc32c-none&data_digest=NONE",
        );
        let c = u.chap.as_ref().unwrap();
        let t = c.target.as_ref().unwrap();
        assert_eq!(t.user, "tu");
        assert_eq!(secret(t), b"a&b%c=");
        assert_eq!(u.header_digest, Some(vec![Digest::Crc32c, Digest::None]));
        assert_eq!(u.data_digest, Some(vec![Digest::None]));
        assert_eq!(
            parse("iscsi://h/iqn.a/0?header_digest=none-crc32c").header_digest,
            Some(vec![Digest::None, Digest::Crc32c])
        );
        assert_eq!(
            parse("iscsi://h/iqn.a/0?data_digest=crc32c").data_digest,
            Some(vec![Digest::Crc32c])
        );
        // '+' stays a plus sign.
        let plus = parse("iscsi://u%p@h/iqn.a/0?target_user=t+u&target_password=x+y");
        let t = plus.chap.unwrap().target.unwrap();
        assert_eq!((t.user.as_str(), secret(&t)), ("t+u", &b"x+y"[..]));
    }

    #[test]
    fn bad_query_arguments() {
        assert_eq!(
            err("iscsi://h/iqn.a/0?color=blue"),
            UrlError::UnknownKey("color".into())
        );
        assert_eq!(
            err("iscsi://h/iqn.a/0?header_digest"),
            UrlError::MissingValue("header_digest".into())
        );
        assert_eq!(
            err("iscsi://h/iqn.a/0?header_digest=md5"),
            UrlError::BadDigest("header_digest")
        );
        assert_eq!(
            err("iscsi://h/iqn.a/0?data_digest=crc32c-crc32c"),
            UrlError::BadDigest("data_digest")
        );
        assert_eq!(
            err("iscsi://h/iqn.a/0?data_digest=none&data_digest=none"),
            UrlError::DuplicateKey("data_digest".into())
        );
        assert_eq!(
            err("iscsi://u%p@h/iqn.a/0?target_user=x&target_password=%zz"),
            UrlError::BadPercentEncoding("target_password")
        );
        assert_eq!(
            err("iscsi://h/iqn.a/0?target_user=tu"),
            UrlError::MutualWithoutUser
        );
        assert_eq!(
            err("iscsi://u@h/iqn.a/0?target_user="),
            UrlError::EmptyValue("target_user")
        );
        // A key that may be a piece of a password is not echoed.
        assert_eq!(
            err("iscsi://h/iqn.a/0?pa$$w0rd=1"),
            UrlError::UnknownKey("(not shown)".into())
        );
        // An empty query and empty arguments are fine.
        assert_eq!(parse("iscsi://h/iqn.a/0?").lun, Some(0));
        assert_eq!(parse("iscsi://h/iqn.a/0?&").lun, Some(0));
    }

    #[test]
    fn question_mark_in_a_password_is_refused_without_echo() {
        let e = err("iscsi://user%pa?zq=x&y@h/iqn.a/0");
        assert_eq!(e, UrlError::QuestionMarkInPassword);
        assert!(!e.to_string().contains("zq"), "{e}");
    }

    #[test]
    fn target_name_is_percent_decoded() {
        assert_eq!(
            parse("iscsi://h/iqn.a%3Ab%2Fc/0").target.as_deref(),
            Some("iqn.a:b/c")
        );
        assert_eq!(
            err("iscsi://h/iqn.a%2/0"),
            UrlError::BadPercentEncoding("target name")
        );
        assert_eq!(err("iscsi://h/iqn%FF/0"), UrlError::NotUtf8("target name"));
    }

    #[test]
    fn display_redacts_passwords_and_round_trips() {
        let u = parse("iscsi://alice%topsecret99@[::1]:3262/iqn.a:b/7?target_user=tgt&target_password=other1234567&header_digest=crc32c");
        let shown = u.to_string();
        assert_eq!(
            shown,
            "iscsi://alice%***@[::1]:3262/iqn.a:b/7?target_user=tgt&target_password=***&header_digest=crc32c"
        );
        assert!(!shown.contains("topsecret") && !shown.contains("other1234567"));
        assert!(!format!("{u:?}").contains("topsecret"));
        let back = parse(&shown);
        assert_eq!(
            (back.portal, back.target, back.lun),
            (u.portal, u.target, u.lun)
        );

        assert_eq!(parse("iscsi://h").to_string(), "iscsi://h:3260/");
        assert_eq!(parse("iscsi://h/iqn.a").to_string(), "iscsi://h:3260/iqn.a");
        assert_eq!(
            parse("iscsi://bob@h/iqn.a/0").to_string(),
            "iscsi://bob@h:3260/iqn.a/0"
        );
    }

    #[test]
    fn errors_never_contain_the_password() {
        let cases = [
            "iscsi://u%hunter2hunter2@h:99999/iqn.a/0",
            "iscsi://u%hunter2hunter2@h/iqn.a/zz",
            "iscsi://u%hunter2hunter2@h/iqn.a/0?x=1",
            "iscsi://u%hunter2hunter2@::1/iqn.a/0",
            "iscsi://u%hunter2hunter2@h/iqn.a/0?target_password=hunter2hunter2&q",
            "iscsi://u%hunter2?hunter2@h/iqn.a/0",
            "iscsi://u%hunter2hunter2/iqn.a/0",
        ];
        for s in cases {
            let e = err(s).to_string();
            assert!(!e.contains("hunter2"), "{s}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn secrets_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        // viscsi's variable wins over libiscsi's; the URL's password over both.
        let mut u = parse("iscsi://bob@h/iqn.a/0");
        u.fill_secrets_from(env(&[
            (LIBISCSI_ENV_CHAP_PASSWORD, "libsecret123"),
            (ENV_CHAP_PASSWORD, "vissecret123"),
        ]));
        assert_eq!(
            secret(&u.chap.as_ref().unwrap().credentials),
            b"vissecret123"
        );
        u.check_credentials().unwrap();

        let mut u = parse("iscsi://bob@h/iqn.a/0");
        u.fill_secrets_from(env(&[
            (ENV_CHAP_PASSWORD, ""),
            (LIBISCSI_ENV_CHAP_PASSWORD, "libsecret123"),
        ]));
        assert_eq!(
            secret(&u.chap.as_ref().unwrap().credentials),
            b"libsecret123"
        );

        let mut u = parse("iscsi://bob%inurl@h/iqn.a/0");
        u.fill_secrets_from(env(&[(ENV_CHAP_PASSWORD, "fromenv")]));
        assert_eq!(secret(&u.chap.as_ref().unwrap().credentials), b"inurl");

        // Mutual CHAP entirely from libiscsi's variables.
        let mut u = parse("iscsi://bob%pw@h/iqn.a/0");
        u.fill_secrets_from(env(&[
            (LIBISCSI_ENV_CHAP_TARGET_USERNAME, "tgt"),
            (LIBISCSI_ENV_CHAP_TARGET_PASSWORD, "tgtsecret"),
        ]));
        let t = u.chap.as_ref().unwrap().target.as_ref().unwrap();
        assert_eq!((t.user.as_str(), secret(t)), ("tgt", &b"tgtsecret"[..]));

        // target_user in the URL, its secret from viscsi's variable.
        let mut u = parse("iscsi://bob%pw@h/iqn.a/0?target_user=tgt");
        assert_eq!(
            u.check_credentials(),
            Err(UrlError::MissingTargetSecret("tgt".into()))
        );
        u.fill_secrets_from(env(&[(ENV_CHAP_TARGET_PASSWORD, "tsecret")]));
        u.check_credentials().unwrap();

        // target_password without a user: the user may come from the environment.
        let mut u = parse("iscsi://bob%pw@h/iqn.a/0?target_password=tsecret");
        assert_eq!(u.check_credentials(), Err(UrlError::MissingTargetUser));
        u.fill_secrets_from(env(&[(LIBISCSI_ENV_CHAP_TARGET_USERNAME, "tgt")]));
        u.check_credentials().unwrap();

        // No CHAP user: nothing to fill.
        let mut u = parse("iscsi://h/iqn.a/0");
        u.fill_secrets_from(env(&[(ENV_CHAP_PASSWORD, "x")]));
        assert!(u.chap.is_none());
    }

    #[test]
    fn secrets_from_files_and_flags() {
        let mut u = parse("iscsi://bob@h/iqn.a/0");
        u.set_secret(b"filesecret".to_vec()).unwrap();
        assert_eq!(
            u.set_secret(b"again".to_vec()),
            Err(UrlError::SecretGivenTwice)
        );
        assert_eq!(
            u.set_target_secret(b"t".to_vec()),
            Err(UrlError::TargetSecretWithoutUser)
        );
        u.set_target_user("tgt").unwrap();
        u.set_target_secret(b"tsecret".to_vec()).unwrap();
        u.check_credentials().unwrap();

        let mut plain = parse("iscsi://h/iqn.a/0");
        assert_eq!(
            plain.set_secret(b"x".to_vec()),
            Err(UrlError::SecretWithoutUser)
        );
        plain.set_user("carol").unwrap();
        plain.set_secret(b"x".to_vec()).unwrap();
        plain.check_credentials().unwrap();
        assert_eq!(plain.set_user("dave"), Err(UrlError::UserGivenTwice));
        assert_eq!(plain.set_secret(Vec::new()), Err(UrlError::EmptySecret));

        let dir = std::env::temp_dir().join(format!("viscsi-url-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, b"line secret\r\n").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), b"line secret");
        std::fs::write(&file, b"two\n\n").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), b"two\n");
        std::fs::write(&file, b"bare").unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), b"bare");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn digest_lists() {
        assert_eq!(parse_digests("none", "x").unwrap(), vec![Digest::None]);
        assert_eq!(
            parse_digests("CRC32C,None", "x").unwrap(),
            vec![Digest::Crc32c, Digest::None]
        );
        assert!(parse_digests("", "x").is_err());
        assert_eq!(
            digests_to_string(&[Digest::None, Digest::Crc32c]),
            "none-crc32c"
        );
    }

    #[test]
    fn portal_arguments() {
        assert_eq!(parse_portal("h").unwrap(), "h:3260");
        assert_eq!(parse_portal("127.0.0.1:1").unwrap(), "127.0.0.1:1");
        assert_eq!(parse_portal("[::1]").unwrap(), "[::1]:3260");
        assert!(parse_portal("::1").is_err());
        assert_eq!(
            IscsiUrl::portal_only("h:5").unwrap().to_string(),
            "iscsi://h:5/"
        );
    }

    #[test]
    fn urls_in_free_text_are_redacted() {
        let text =
            "invalid value 'iscsi://u%hunter2@h/iqn.a/0?target_password=hunter3' for '<URL>'";
        let out = redact_urls(text);
        assert!(!out.contains("hunter"), "{out}");
        assert!(out.contains("iscsi://u%***@h:3260/iqn.a/0"), "{out}");
        // Unparseable URLs are still redacted.
        let bad = redact_urls("x iscsi://u%hunter2@h/iqn.a/zz?target_password=hunter3 y");
        assert!(!bad.contains("hunter"), "{bad}");
        assert!(
            bad.starts_with("x iscsi://u%***@") && bad.ends_with(" y"),
            "{bad}"
        );
        let q = redact_urls("iscsi://u%hun?ter2@h/iqn.a/0");
        assert!(!q.contains("hun"), "{q}");
        assert_eq!(redact_urls("no url here"), "no url here");
    }
}
