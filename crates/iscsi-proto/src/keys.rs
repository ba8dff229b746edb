//! Login and text keys (RFC 7143 §6, §12, §13; RFC 7144 §2.1): the key table, the text format
//! and key negotiation for both the responder (our target) and the originator (our initiator).
//!
//! # What is here
//!
//! - [`parse_text`] / [`encode_text`]: the NUL-separated `key=value` data segment of Login and
//!   Text PDUs (§6.1), with the RFC's limits on key names and values.
//! - [`KEYS`]: one [`KeyDef`] row per key — name, [`KeyKind`] (the result function), default,
//!   valid values, [`Phase`] ("Use"), [`Scope`], [`Senders`] and the "Irrelevant when" rules.
//!   Negotiation code reads the rows; it does not special-case key names.
//! - [`Negotiation`]: the negotiation state of one login (or of text exchanges in full feature
//!   phase) for one side, driven by the table. [`Negotiation::respond`] answers a peer's offers;
//!   [`Negotiation::offers`] and [`Negotiation::accept_answers`] drive our own offers and check
//!   the answers against the result function. [`Negotiation::params`] gives the
//!   [`SessionParams`] in force.
//!
//! # What is not here
//!
//! No I/O, no PDUs (the caller reassembles the data segment of a multi-PDU login or text exchange
//! before [`parse_text`]), no login state machine (CSG/NSG, T and C bits, status codes — errors
//! only say which login status class they map to), no authentication (AuthMethod and `CHAP_*`
//! are passed through untouched to [`crate::chap`]) and no SendTargets answer (the target role
//! builds it from its target list).
//!
//! # Decisions where the RFC leaves room
//!
//! - A data segment whose last pair lacks its NUL terminator is accepted (§6.1 says every pair
//!   MUST be followed by one; the caller hands us exactly DataSegmentLength bytes, so there is no
//!   ambiguity), and trailing NUL bytes are accepted as padding. An empty pair between two pairs
//!   is an error.
//! - Numbers are accepted as decimal-constant or hex-constant (§6.1 numerical-value); binary
//!   values (CHAP) additionally as base64 (`0b`). We always emit decimal numbers.
//! - Obsoleted marker keys (§13.25): `OFMarker`/`IFMarker` are answered `No` (allowed, and what
//!   RFC 3720 initiators expect), `OFMarkInt`/`IFMarkInt` are answered `Reject` (required).
//! - Operational keys offered during the security stage are negotiated (the responder is
//!   lenient); our own originator offers them only in the operational stage.
//! - A key that is not allowed in the current phase (login-only keys in full feature phase,
//!   leading-only keys on a non-leading connection, security keys outside the security stage,
//!   SendTargets during login), or sent by the wrong side, is an error rather than a `Reject`
//!   answer.
//! - A list offer with no value we support is answered `Reject`; the key then keeps its default.
//! - The responder answers every negotiated key, including the cases where §6.2.2 makes the
//!   answer optional (AND with `No`, OR with `Yes`).

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;

/// Longest key name (§6.1).
pub const MAX_KEY_NAME_LEN: usize = 63;
/// Longest value of a key unless its [`KeyDef::max_value_len`] says otherwise (§6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// Longest value of a key holding a large binary value (CHAP_C, CHAP_R: up to 1024 bytes as hex
/// or base64; §6.1 allows 8192 bytes).
pub const MAX_LARGE_VALUE_LEN: usize = 8192;
/// Longest iSCSI name (RFC 3720 §3.2.6.1, kept by RFC 7143 §4.2.7.1).
pub const MAX_ISCSI_NAME_LEN: usize = 223;

/// Answer to a key the responder does not know (§6.2).
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
/// Answer to an offer the responder cannot accept (§6.2).
pub const REJECT: &str = "Reject";
/// Answer to a key that does not matter for this session (§6.2).
pub const IRRELEVANT: &str = "Irrelevant";

/// Login status "Initiator error" (class 2, detail 0x00): malformed or illegal keys.
pub const STATUS_INITIATOR_ERROR: u16 = 0x0200;
/// Login status "Authentication failure" (class 2, detail 0x01).
pub const STATUS_AUTH_FAILURE: u16 = 0x0201;
/// Login status "Missing parameter" (class 2, detail 0x07): a required key was not sent.
pub const STATUS_MISSING_PARAMETER: u16 = 0x0207;

fn is_special_value(v: &str) -> bool {
    v == NOT_UNDERSTOOD || v == REJECT || v == IRRELEVANT
}

// ---------------------------------------------------------------------------------------------
// Text format
// ---------------------------------------------------------------------------------------------

/// A malformed data segment. Every variant maps to login status
/// [`STATUS_INITIATOR_ERROR`] when the initiator sent it (or to a Reject PDU in full feature
/// phase); messages never include values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// A pair is not valid UTF-8.
    #[error("text pair {index} is not valid UTF-8")]
    NotUtf8 {
        /// Position of the pair in the segment.
        index: usize,
    },
    /// Two NULs in a row before the end of the segment.
    #[error("text pair {index} is empty")]
    EmptyPair {
        /// Position of the pair in the segment.
        index: usize,
    },
    /// A pair without `=`.
    #[error("text pair {index} has no '='")]
    MissingEquals {
        /// Position of the pair in the segment.
        index: usize,
    },
    /// A pair starting with `=`.
    #[error("text pair {index} has an empty key name")]
    EmptyKey {
        /// Position of the pair in the segment.
        index: usize,
    },
    /// A key name over [`MAX_KEY_NAME_LEN`] bytes.
    #[error("key name of text pair {index} is longer than 63 bytes")]
    KeyTooLong {
        /// Position of the pair in the segment.
        index: usize,
    },
    /// A key name with a character outside `A-Z a-z 0-9 . - + @ _`.
    #[error("key name of text pair {index} has an invalid character")]
    InvalidKeyName {
        /// Position of the pair in the segment.
        index: usize,
    },
    /// A value over the key's limit.
    #[error("value of key {key} is longer than {max} bytes")]
    ValueTooLong {
        /// The key name (already checked to be a valid key name).
        key: String,
        /// The limit.
        max: usize,
    },
    /// The same key twice in one segment (§6.2: a login error).
    #[error("key {key} appears more than once")]
    DuplicateKey {
        /// The key name.
        key: String,
    },
}

impl TextError {
    /// The login status class this error maps to when the peer sent the text.
    pub fn login_status(&self) -> u16 {
        STATUS_INITIATOR_ERROR
    }
}

fn valid_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_')
}

/// Parses a Login or Text data segment into `(key, value)` pairs, refusing duplicate keys.
///
/// Rules (RFC 7143 §6.1): pairs are separated by NUL; the key is everything before the first
/// `=`, non-empty, at most 63 bytes of `A-Z a-z 0-9 . - + @ _`; the value is valid UTF-8 of at
/// most [`KeyDef::max_value_len`] bytes (255, or 8192 for CHAP_C/CHAP_R; unknown keys: 255).
/// A missing final NUL and trailing NUL padding are tolerated (see the module documentation).
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let pairs = parse_text_multi(data)?;
    let mut seen = BTreeSet::new();
    for (k, _) in &pairs {
        if !seen.insert(k.as_str()) {
            return Err(TextError::DuplicateKey { key: k.clone() });
        }
    }
    Ok(pairs)
}

/// Like [`parse_text`] but allows a key to repeat, as in a SendTargets response where
/// `TargetName` and `TargetAddress` occur once per target (§13.3).
pub fn parse_text_multi(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let end = match data.iter().rposition(|&b| b != 0) {
        Some(last) => last + 1,
        None => return Ok(Vec::new()),
    };
    let mut pairs = Vec::new();
    for (index, piece) in data[..end].split(|&b| b == 0).enumerate() {
        if piece.is_empty() {
            return Err(TextError::EmptyPair { index });
        }
        let eq = piece
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TextError::MissingEquals { index })?;
        let (key, value) = (&piece[..eq], &piece[eq + 1..]);
        if key.is_empty() {
            return Err(TextError::EmptyKey { index });
        }
        if key.len() > MAX_KEY_NAME_LEN {
            return Err(TextError::KeyTooLong { index });
        }
        if !key.iter().all(|&b| valid_key_char(b)) {
            return Err(TextError::InvalidKeyName { index });
        }
        // The key is ASCII by now.
        let key = String::from_utf8_lossy(key).into_owned();
        let max = lookup(&key).map_or(MAX_VALUE_LEN, |d| d.max_value_len);
        if value.len() > max {
            return Err(TextError::ValueTooLong { key, max });
        }
        let value = std::str::from_utf8(value)
            .map_err(|_| TextError::NotUtf8 { index })?
            .to_owned();
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Encodes pairs as `key=value\0...`. The caller passes valid keys and values (see
/// [`parse_text`]); nothing is escaped.
pub fn encode_text(pairs: &[(impl AsRef<str>, impl AsRef<str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Value formats (§6.1)
// ---------------------------------------------------------------------------------------------

/// Parses a numerical-value: a decimal-constant (`0`, `8192`) or a hex-constant (`0x2000`,
/// `0X2000`) below 2^64. Signs, spaces and empty strings are refused.
pub fn parse_numeric(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let digits = hex.trim_start_matches('0');
        if digits.len() > 16 {
            return None;
        }
        if digits.is_empty() {
            return Some(0);
        }
        return u64::from_str_radix(digits, 16).ok();
    }
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Parses a binary-value: `0x`/`0X` followed by hex digits of either case (an odd count gets an
/// implied leading zero) or `0b`/`0B` followed by base64 (RFC 4648, padding optional). At least
/// one byte.
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() {
            return None;
        }
        let bytes = hex.as_bytes();
        let mut out = Vec::with_capacity(bytes.len() / 2 + 1);
        let mut i = 0;
        if bytes.len() % 2 == 1 {
            out.push(hex_nibble(bytes[0])?);
            i = 1;
        }
        while i + 1 < bytes.len() {
            out.push(hex_nibble(bytes[i])? << 4 | hex_nibble(bytes[i + 1])?);
            i += 2;
        }
        return Some(out);
    }
    if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let out = engine.decode(b64).ok()?;
        return (!out.is_empty()).then_some(out);
    }
    None
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Encodes bytes as a hex-constant, `0x` followed by lowercase digits.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn bool_str(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

// ---------------------------------------------------------------------------------------------
// Public negotiation types
// ---------------------------------------------------------------------------------------------

/// Which side of the iSCSI login we are.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The initiator (originates the login).
    Initiator,
    /// The target (responds to the login).
    Target,
}

impl Role {
    fn peer(self) -> Role {
        match self {
            Role::Initiator => Role::Target,
            Role::Target => Role::Initiator,
        }
    }
}

/// A digest for HeaderDigest / DataDigest (§13.1).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Digest {
    /// `None`.
    None,
    /// `CRC32C`.
    Crc32c,
}

impl Digest {
    /// The value as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Digest::None => "None",
            Digest::Crc32c => "CRC32C",
        }
    }
}

/// SessionType (§13.21).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum SessionType {
    /// `Normal`: a session for SCSI commands.
    #[default]
    Normal,
    /// `Discovery`: a session for SendTargets only.
    Discovery,
}

impl SessionType {
    /// The value as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionType::Normal => "Normal",
            SessionType::Discovery => "Discovery",
        }
    }

    fn parse(v: &str) -> Option<Self> {
        match v {
            "Normal" => Some(SessionType::Normal),
            "Discovery" => Some(SessionType::Discovery),
            _ => None,
        }
    }
}

/// The stage of the exchange a set of keys belongs to (the CSG of a Login PDU, or full feature
/// phase for Text PDUs).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Login, security negotiation stage (CSG 0).
    Security,
    /// Login, operational negotiation stage (CSG 1).
    Operational,
    /// Full feature phase (Text Request / Text Response).
    FullFeature,
}

/// The result function of a key (§6.2, §13).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// Each side declares a text value; no answer.
    Declarative,
    /// Each side declares a number; no answer (MaxRecvDataSegmentLength, TargetPortalGroupTag).
    NumericDeclarative,
    /// Boolean, result = offer AND answer.
    BooleanAnd,
    /// Boolean, result = offer OR answer.
    BooleanOr,
    /// Number, result = minimum of offer and responder's value.
    NumericMin,
    /// Number, result = maximum of offer and responder's value.
    NumericMax,
    /// List, the responder picks the first value of the originator's list it supports.
    ListSelect,
    /// Security keys (AuthMethod, CHAP_*): handed untouched to the authentication layer.
    Auth,
    /// A request answered by the target role (SendTargets).
    Request,
    /// A key obsoleted by RFC 7143 §13.25, always answered with this constant.
    Obsolete {
        /// The fixed answer.
        answer: &'static str,
    },
}

impl KeyKind {
    fn is_negotiated(self) -> bool {
        matches!(
            self,
            KeyKind::BooleanAnd
                | KeyKind::BooleanOr
                | KeyKind::NumericMin
                | KeyKind::NumericMax
                | KeyKind::ListSelect
        )
    }

    fn is_declarative(self) -> bool {
        matches!(self, KeyKind::Declarative | KeyKind::NumericDeclarative)
    }
}

/// When a key may be used (the RFC's "Use").
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Security negotiation stage only (AuthMethod, CHAP_*).
    SecurityOnly,
    /// Any login stage of any connection ("IO", initialize only).
    LoginOnly,
    /// Login of the leading connection only ("LO").
    LeadingOnly,
    /// Full feature phase only ("FFPO").
    FullFeatureOnly,
    /// Login and full feature phase ("ALL").
    Any,
}

/// The scope of a key's value.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Session-wide ("SW").
    Session,
    /// Per connection ("CO").
    Connection,
}

/// Who may send a key.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Senders {
    /// The initiator only.
    Initiator,
    /// The target only.
    Target,
    /// Both.
    Both,
}

impl Senders {
    fn allows(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Senders::Both, _)
                | (Senders::Initiator, Role::Initiator)
                | (Senders::Target, Role::Target)
        )
    }
}

/// The values a key admits.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ValueRange {
    /// `Yes` or `No`.
    Boolean,
    /// A numerical-value in `min..=max`.
    Numeric {
        /// Smallest admissible value.
        min: u64,
        /// Largest admissible value.
        max: u64,
    },
    /// One value (or, for [`KeyKind::ListSelect`], a comma-separated list) from these.
    List(&'static [&'static str]),
    /// An iSCSI name: non-empty, at most [`MAX_ISCSI_NAME_LEN`] bytes.
    Name,
    /// Any text.
    Text,
}

/// When the originator of a key sends it unprompted.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Announce {
    /// Never unprompted (the key is only answered, or sent by another layer).
    Never,
    /// In the first PDU of the login (any stage).
    FirstPdu,
    /// In the first PDU of the operational stage.
    Operational,
}

/// A condition `key = value` on the negotiated, declared or default value of another key.
pub type Condition = (&'static str, &'static str);

/// What we bring to a key: derived from [`NegotiationConfig`].
#[derive(Clone, Debug)]
enum Local {
    Bool(bool),
    Num(u64),
    List(Vec<&'static str>),
    Text(String),
}

type LocalFn = fn(&NegotiationConfig, Role) -> Option<Local>;
type ApplyFn = fn(&mut SessionParams, &str, bool);

/// One row of the key table.
#[derive(Debug)]
pub struct KeyDef {
    /// The key name, as on the wire.
    pub name: &'static str,
    /// The result function.
    pub kind: KeyKind,
    /// The RFC default, as on the wire.
    pub default: Option<&'static str>,
    /// The admissible values.
    pub values: ValueRange,
    /// When the key may be used.
    pub phase: Phase,
    /// Session-wide or per connection.
    pub scope: Scope,
    /// Who may send it.
    pub senders: Senders,
    /// "Irrelevant when": the key is irrelevant if all conditions of any one inner slice hold.
    pub irrelevant_when: &'static [&'static [Condition]],
    /// The result may not exceed the value of this other key (FirstBurstLength ≤
    /// MaxBurstLength).
    pub not_above: Option<&'static str>,
    /// The initiator must send the key in its first Login Request when all conditions hold.
    pub required_when: Option<&'static [Condition]>,
    /// When the originator sends it unprompted.
    pub announce: Announce,
    /// Longest admissible value in bytes.
    pub max_value_len: usize,
    local: LocalFn,
    apply: ApplyFn,
}

impl KeyDef {
    fn numeric_bounds(&self) -> (u64, u64) {
        match self.values {
            ValueRange::Numeric { min, max } => (min, max),
            _ => (0, u64::MAX),
        }
    }

    fn depends_on_others(&self) -> bool {
        self.not_above.is_some()
            || self
                .irrelevant_when
                .iter()
                .flat_map(|c| c.iter())
                .any(|(k, _)| *k != "SessionType")
    }

    /// Validates a declared value; returns its canonical form.
    fn check_declared(&self, v: &str) -> Option<String> {
        match self.values {
            ValueRange::Numeric { min, max } => {
                let n = parse_numeric(v)?;
                (min..=max).contains(&n).then(|| n.to_string())
            }
            ValueRange::Boolean => parse_bool(v).map(|b| bool_str(b).to_owned()),
            ValueRange::List(allowed) => allowed.contains(&v).then(|| v.to_owned()),
            ValueRange::Name => {
                (!v.is_empty() && v.len() <= MAX_ISCSI_NAME_LEN).then(|| v.to_owned())
            }
            ValueRange::Text => Some(v.to_owned()),
        }
    }

    /// Clamps our own numeric value into the key's range, so a bad configuration cannot put an
    /// inadmissible value on the wire.
    fn clamp(&self, n: u64) -> u64 {
        let (min, max) = self.numeric_bounds();
        n.clamp(min, max)
    }
}

fn none_local(_: &NegotiationConfig, _: Role) -> Option<Local> {
    None
}

fn no_apply(_: &mut SessionParams, _: &str, _: bool) {}

fn num_u32(v: &str) -> u32 {
    parse_numeric(v).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn num_u16(v: &str) -> u16 {
    parse_numeric(v).map_or(0, |n| u16::try_from(n).unwrap_or(u16::MAX))
}

fn digest_local(list: &[Digest]) -> Local {
    let mut out: Vec<&'static str> = Vec::new();
    for d in list {
        if !out.contains(&d.as_str()) {
            out.push(d.as_str());
        }
    }
    if out.is_empty() {
        out.push(Digest::None.as_str());
    }
    Local::List(out)
}

const IN_DISCOVERY: &[Condition] = &[("SessionType", "Discovery")];
const RANGE_DATA_LEN: ValueRange = ValueRange::Numeric {
    min: 512,
    max: (1 << 24) - 1,
};
const RANGE_U16_NONZERO: ValueRange = ValueRange::Numeric { min: 1, max: 65535 };
const RANGE_TIME: ValueRange = ValueRange::Numeric { min: 0, max: 3600 };
const AUTH_METHODS: &[&str] = &["KRB5", "SRP", "SPKM1", "SPKM2", "CHAP", "None"];

/// A row with the common defaults, for the table below.
const fn row(name: &'static str, kind: KeyKind, values: ValueRange, phase: Phase) -> KeyDef {
    KeyDef {
        name,
        kind,
        default: None,
        values,
        phase,
        scope: Scope::Session,
        senders: Senders::Both,
        irrelevant_when: &[],
        not_above: None,
        required_when: None,
        announce: Announce::Never,
        max_value_len: MAX_VALUE_LEN,
        local: none_local,
        apply: no_apply,
    }
}

/// Every key of RFC 7143 §12–§13 and RFC 7144 §2.1. Keys not in this table (including `X-`
/// private and `X#` public extension keys) are answered `NotUnderstood`.
pub static KEYS: &[KeyDef] = &[
    // §13.1
    KeyDef {
        default: Some("None"),
        scope: Scope::Connection,
        announce: Announce::Operational,
        local: |c, _| Some(digest_local(&c.header_digest)),
        apply: |p, v, _| p.header_digest = v == Digest::Crc32c.as_str(),
        ..row(
            "HeaderDigest",
            KeyKind::ListSelect,
            ValueRange::List(&["None", "CRC32C"]),
            Phase::LoginOnly,
        )
    },
    KeyDef {
        default: Some("None"),
        scope: Scope::Connection,
        announce: Announce::Operational,
        local: |c, _| Some(digest_local(&c.data_digest)),
        apply: |p, v, _| p.data_digest = v == Digest::Crc32c.as_str(),
        ..row(
            "DataDigest",
            KeyKind::ListSelect,
            ValueRange::List(&["None", "CRC32C"]),
            Phase::LoginOnly,
        )
    },
    // §13.2
    KeyDef {
        default: Some("1"),
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.max_connections.into())),
        apply: |p, v, _| p.max_connections = num_u16(v),
        ..row(
            "MaxConnections",
            KeyKind::NumericMin,
            RANGE_U16_NONZERO,
            Phase::LeadingOnly,
        )
    },
    // §13.3
    KeyDef {
        senders: Senders::Initiator,
        ..row(
            "SendTargets",
            KeyKind::Request,
            ValueRange::Text,
            Phase::FullFeatureOnly,
        )
    },
    // §13.4: "IO by initiator, FFPO by target" — Phase::Any covers both.
    KeyDef {
        required_when: Some(&[("SessionType", "Normal")]),
        announce: Announce::FirstPdu,
        local: |c, r| match (r, c.session_type) {
            (Role::Initiator, SessionType::Normal) => c.target_name.clone().map(Local::Text),
            _ => None,
        },
        apply: |p, v, _| p.target_name = Some(v.to_owned()),
        ..row(
            "TargetName",
            KeyKind::Declarative,
            ValueRange::Name,
            Phase::Any,
        )
    },
    // §13.5
    KeyDef {
        senders: Senders::Initiator,
        required_when: Some(&[]),
        announce: Announce::FirstPdu,
        local: |c, _| c.initiator_name.clone().map(Local::Text),
        apply: |p, v, _| p.initiator_name = Some(v.to_owned()),
        ..row(
            "InitiatorName",
            KeyKind::Declarative,
            ValueRange::Name,
            Phase::LoginOnly,
        )
    },
    // §13.6
    KeyDef {
        senders: Senders::Target,
        announce: Announce::FirstPdu,
        local: |c, _| c.target_alias.clone().map(Local::Text),
        apply: |p, v, _| p.target_alias = Some(v.to_owned()),
        ..row(
            "TargetAlias",
            KeyKind::Declarative,
            ValueRange::Text,
            Phase::Any,
        )
    },
    // §13.7
    KeyDef {
        senders: Senders::Initiator,
        announce: Announce::FirstPdu,
        local: |c, _| c.initiator_alias.clone().map(Local::Text),
        apply: |p, v, _| p.initiator_alias = Some(v.to_owned()),
        ..row(
            "InitiatorAlias",
            KeyKind::Declarative,
            ValueRange::Text,
            Phase::Any,
        )
    },
    // §13.8: in SendTargets responses and login redirection; the login layer reads it from
    // the raw pairs.
    KeyDef {
        senders: Senders::Target,
        ..row(
            "TargetAddress",
            KeyKind::Declarative,
            ValueRange::Text,
            Phase::Any,
        )
    },
    // §13.9
    KeyDef {
        senders: Senders::Target,
        announce: Announce::FirstPdu,
        local: |c, _| c.target_portal_group_tag.map(|t| Local::Num(t.into())),
        apply: |p, v, _| p.tpgt = Some(num_u16(v)),
        ..row(
            "TargetPortalGroupTag",
            KeyKind::NumericDeclarative,
            ValueRange::Numeric { min: 0, max: 65535 },
            Phase::LoginOnly,
        )
    },
    // §13.10
    KeyDef {
        default: Some("Yes"),
        irrelevant_when: &[IN_DISCOVERY],
        announce: Announce::Operational,
        local: |c, _| Some(Local::Bool(c.initial_r2t)),
        apply: |p, v, _| p.initial_r2t = v == "Yes",
        ..row(
            "InitialR2T",
            KeyKind::BooleanOr,
            ValueRange::Boolean,
            Phase::LeadingOnly,
        )
    },
    // §13.11
    KeyDef {
        default: Some("Yes"),
        irrelevant_when: &[IN_DISCOVERY],
        announce: Announce::Operational,
        local: |c, _| Some(Local::Bool(c.immediate_data)),
        apply: |p, v, _| p.immediate_data = v == "Yes",
        ..row(
            "ImmediateData",
            KeyKind::BooleanAnd,
            ValueRange::Boolean,
            Phase::LeadingOnly,
        )
    },
    // §13.12: declarative per direction; ours ends in max_recv, the peer's in max_xmit.
    KeyDef {
        default: Some("8192"),
        scope: Scope::Connection,
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.max_recv_data_segment_length.into())),
        apply: |p, v, from_peer| {
            if from_peer {
                p.max_xmit_data_segment_length = num_u32(v);
            } else {
                p.max_recv_data_segment_length = num_u32(v);
            }
        },
        ..row(
            "MaxRecvDataSegmentLength",
            KeyKind::NumericDeclarative,
            RANGE_DATA_LEN,
            Phase::Any,
        )
    },
    // §13.13
    KeyDef {
        default: Some("262144"),
        irrelevant_when: &[IN_DISCOVERY],
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.max_burst_length.into())),
        apply: |p, v, _| p.max_burst_length = num_u32(v),
        ..row(
            "MaxBurstLength",
            KeyKind::NumericMin,
            RANGE_DATA_LEN,
            Phase::LeadingOnly,
        )
    },
    // §13.14
    KeyDef {
        default: Some("65536"),
        irrelevant_when: &[
            IN_DISCOVERY,
            &[("InitialR2T", "Yes"), ("ImmediateData", "No")],
        ],
        not_above: Some("MaxBurstLength"),
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.first_burst_length.into())),
        apply: |p, v, _| p.first_burst_length = num_u32(v),
        ..row(
            "FirstBurstLength",
            KeyKind::NumericMin,
            RANGE_DATA_LEN,
            Phase::LeadingOnly,
        )
    },
    // §13.15
    KeyDef {
        default: Some("2"),
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.default_time2wait.into())),
        apply: |p, v, _| p.default_time2wait = num_u16(v),
        ..row(
            "DefaultTime2Wait",
            KeyKind::NumericMax,
            RANGE_TIME,
            Phase::LeadingOnly,
        )
    },
    // §13.16
    KeyDef {
        default: Some("20"),
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.default_time2retain.into())),
        apply: |p, v, _| p.default_time2retain = num_u16(v),
        ..row(
            "DefaultTime2Retain",
            KeyKind::NumericMin,
            RANGE_TIME,
            Phase::LeadingOnly,
        )
    },
    // §13.17
    KeyDef {
        default: Some("1"),
        irrelevant_when: &[IN_DISCOVERY],
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.max_outstanding_r2t.into())),
        apply: |p, v, _| p.max_outstanding_r2t = num_u16(v),
        ..row(
            "MaxOutstandingR2T",
            KeyKind::NumericMin,
            RANGE_U16_NONZERO,
            Phase::LeadingOnly,
        )
    },
    // §13.18
    KeyDef {
        default: Some("Yes"),
        irrelevant_when: &[IN_DISCOVERY],
        announce: Announce::Operational,
        local: |c, _| Some(Local::Bool(c.data_pdu_in_order)),
        apply: |p, v, _| p.data_pdu_in_order = v == "Yes",
        ..row(
            "DataPDUInOrder",
            KeyKind::BooleanOr,
            ValueRange::Boolean,
            Phase::LeadingOnly,
        )
    },
    // §13.19
    KeyDef {
        default: Some("Yes"),
        irrelevant_when: &[IN_DISCOVERY],
        announce: Announce::Operational,
        local: |c, _| Some(Local::Bool(c.data_sequence_in_order)),
        apply: |p, v, _| p.data_sequence_in_order = v == "Yes",
        ..row(
            "DataSequenceInOrder",
            KeyKind::BooleanOr,
            ValueRange::Boolean,
            Phase::LeadingOnly,
        )
    },
    // §13.20
    KeyDef {
        default: Some("0"),
        announce: Announce::Operational,
        local: |c, _| Some(Local::Num(c.error_recovery_level.into())),
        apply: |p, v, _| p.error_recovery_level = u8::try_from(num_u16(v)).unwrap_or(0),
        ..row(
            "ErrorRecoveryLevel",
            KeyKind::NumericMin,
            ValueRange::Numeric { min: 0, max: 2 },
            Phase::LeadingOnly,
        )
    },
    // §13.21: the RFC says LO; we accept it on any connection's login because initiators
    // repeat it on every connection.
    KeyDef {
        default: Some("Normal"),
        senders: Senders::Initiator,
        announce: Announce::FirstPdu,
        local: |c, r| (r == Role::Initiator).then(|| Local::Text(c.session_type.as_str().into())),
        apply: |p, v, _| p.session_type = SessionType::parse(v).unwrap_or_default(),
        ..row(
            "SessionType",
            KeyKind::Declarative,
            ValueRange::List(&["Normal", "Discovery"]),
            Phase::LoginOnly,
        )
    },
    // §12.1
    KeyDef {
        default: Some("None"),
        scope: Scope::Connection,
        ..row(
            "AuthMethod",
            KeyKind::Auth,
            ValueRange::List(AUTH_METHODS),
            Phase::SecurityOnly,
        )
    },
    // §12.1.3
    KeyDef {
        scope: Scope::Connection,
        ..row(
            "CHAP_A",
            KeyKind::Auth,
            ValueRange::Text,
            Phase::SecurityOnly,
        )
    },
    KeyDef {
        scope: Scope::Connection,
        ..row(
            "CHAP_I",
            KeyKind::Auth,
            ValueRange::Text,
            Phase::SecurityOnly,
        )
    },
    KeyDef {
        scope: Scope::Connection,
        max_value_len: MAX_LARGE_VALUE_LEN,
        ..row(
            "CHAP_C",
            KeyKind::Auth,
            ValueRange::Text,
            Phase::SecurityOnly,
        )
    },
    KeyDef {
        scope: Scope::Connection,
        ..row(
            "CHAP_N",
            KeyKind::Auth,
            ValueRange::Text,
            Phase::SecurityOnly,
        )
    },
    KeyDef {
        scope: Scope::Connection,
        max_value_len: MAX_LARGE_VALUE_LEN,
        ..row(
            "CHAP_R",
            KeyKind::Auth,
            ValueRange::Text,
            Phase::SecurityOnly,
        )
    },
    // §13.23
    KeyDef {
        default: Some("RFC3720"),
        irrelevant_when: &[IN_DISCOVERY],
        local: |_, _| Some(Local::List(vec!["RFC3720"])),
        ..row(
            "TaskReporting",
            KeyKind::ListSelect,
            ValueRange::List(&["RFC3720", "ResponseFence", "FastAbort"]),
            Phase::LeadingOnly,
        )
    },
    // RFC 7144 §2.1: 1 = RFC 7143 (what we implement), 2 = RFC 7144.
    KeyDef {
        default: Some("0"),
        irrelevant_when: &[IN_DISCOVERY],
        local: |_, _| Some(Local::Num(1)),
        ..row(
            "iSCSIProtocolLevel",
            KeyKind::NumericMin,
            ValueRange::Numeric { min: 0, max: 31 },
            Phase::LeadingOnly,
        )
    },
    // §13.25 obsoleted keys (RFC 3720 §12.16–12.17).
    KeyDef {
        default: Some("No"),
        scope: Scope::Connection,
        ..row(
            "OFMarker",
            KeyKind::Obsolete { answer: "No" },
            ValueRange::Boolean,
            Phase::LoginOnly,
        )
    },
    KeyDef {
        default: Some("No"),
        scope: Scope::Connection,
        ..row(
            "IFMarker",
            KeyKind::Obsolete { answer: "No" },
            ValueRange::Boolean,
            Phase::LoginOnly,
        )
    },
    KeyDef {
        default: Some("2048"),
        scope: Scope::Connection,
        irrelevant_when: &[&[("OFMarker", "No")]],
        ..row(
            "OFMarkInt",
            KeyKind::Obsolete { answer: REJECT },
            RANGE_U16_NONZERO,
            Phase::LoginOnly,
        )
    },
    KeyDef {
        default: Some("2048"),
        scope: Scope::Connection,
        irrelevant_when: &[&[("IFMarker", "No")]],
        ..row(
            "IFMarkInt",
            KeyKind::Obsolete { answer: REJECT },
            RANGE_U16_NONZERO,
            Phase::LoginOnly,
        )
    },
];

/// Finds a key's row. Key names are case-sensitive (§6.1).
pub fn lookup(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|d| d.name == name)
}

/// What this side is willing to do: a user's configuration.
///
/// `Default` gives the RFC 7143 defaults except: `header_digest` and `data_digest` are
/// `[None, Crc32c]` (prefer no digest, accept CRC32C) and `max_recv_data_segment_length` is
/// 262144. Values outside a key's range are clamped into it before they go on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NegotiationConfig {
    /// Header digests we accept, in preference order.
    pub header_digest: Vec<Digest>,
    /// Data digests we accept, in preference order.
    pub data_digest: Vec<Digest>,
    /// What we can receive in one PDU's data segment (declared to the peer).
    pub max_recv_data_segment_length: u32,
    /// MaxBurstLength we accept (result: minimum).
    pub max_burst_length: u32,
    /// FirstBurstLength we accept (result: minimum, and never above MaxBurstLength).
    pub first_burst_length: u32,
    /// InitialR2T (result: OR).
    pub initial_r2t: bool,
    /// ImmediateData (result: AND).
    pub immediate_data: bool,
    /// MaxOutstandingR2T (result: minimum).
    pub max_outstanding_r2t: u16,
    /// MaxConnections (result: minimum).
    pub max_connections: u16,
    /// DefaultTime2Wait in seconds (result: maximum).
    pub default_time2wait: u16,
    /// DefaultTime2Retain in seconds (result: minimum).
    pub default_time2retain: u16,
    /// DataPDUInOrder (result: OR).
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder (result: OR).
    pub data_sequence_in_order: bool,
    /// Highest ErrorRecoveryLevel we support (result: minimum). viscsi supports 0.
    pub error_recovery_level: u8,
    /// TargetAlias we declare (target role).
    pub target_alias: Option<String>,
    /// InitiatorAlias we declare (initiator role).
    pub initiator_alias: Option<String>,
    /// InitiatorName we declare (initiator role).
    pub initiator_name: Option<String>,
    /// TargetName we ask for (initiator role, normal sessions).
    pub target_name: Option<String>,
    /// SessionType we declare (initiator role).
    pub session_type: SessionType,
    /// TargetPortalGroupTag we declare in the first Login Response (target role).
    pub target_portal_group_tag: Option<u16>,
}

impl Default for NegotiationConfig {
    fn default() -> Self {
        NegotiationConfig {
            header_digest: vec![Digest::None, Digest::Crc32c],
            data_digest: vec![Digest::None, Digest::Crc32c],
            max_recv_data_segment_length: 262_144,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            target_alias: None,
            initiator_alias: None,
            initiator_name: None,
            target_name: None,
            session_type: SessionType::Normal,
            target_portal_group_tag: None,
        }
    }
}

/// The operational parameters in force after login, with both directions separated.
///
/// `Default` is the RFC 7143 defaults: 8192 both ways for data segments, MaxBurstLength 262144,
/// FirstBurstLength 65536, InitialR2T and ImmediateData Yes, MaxOutstandingR2T 1,
/// MaxConnections 1, DefaultTime2Wait 2, DefaultTime2Retain 20, in-order data, ERL 0, no
/// digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    /// HeaderDigest=CRC32C.
    pub header_digest: bool,
    /// DataDigest=CRC32C.
    pub data_digest: bool,
    /// What we declared we receive (8192 if we declared nothing).
    pub max_recv_data_segment_length: u32,
    /// The peer's MaxRecvDataSegmentLength: the limit for data segments we send.
    pub max_xmit_data_segment_length: u32,
    /// MaxBurstLength.
    pub max_burst_length: u32,
    /// FirstBurstLength (never above `max_burst_length`).
    pub first_burst_length: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u16,
    /// MaxConnections.
    pub max_connections: u16,
    /// DefaultTime2Wait in seconds.
    pub default_time2wait: u16,
    /// DefaultTime2Retain in seconds.
    pub default_time2retain: u16,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u8,
    /// SessionType.
    pub session_type: SessionType,
    /// InitiatorName.
    pub initiator_name: Option<String>,
    /// TargetName.
    pub target_name: Option<String>,
    /// InitiatorAlias.
    pub initiator_alias: Option<String>,
    /// TargetAlias.
    pub target_alias: Option<String>,
    /// TargetPortalGroupTag.
    pub tpgt: Option<u16>,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 8192,
            max_xmit_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            session_type: SessionType::Normal,
            initiator_name: None,
            target_name: None,
            initiator_alias: None,
            target_alias: None,
            tpgt: None,
        }
    }
}

/// The responder's output for one batch of offers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// Keys to send back: answers in the order of the offers, then our own declarations.
    pub answers: Vec<(String, String)>,
    /// AuthMethod and CHAP_* keys, untouched, for the authentication layer.
    pub auth_keys: Vec<(String, String)>,
    /// SessionType, when the peer declared it in this batch.
    pub session_type: Option<SessionType>,
    /// InitiatorName, when the peer declared it in this batch.
    pub initiator_name: Option<String>,
    /// TargetName, when the peer sent it in this batch.
    pub target_name: Option<String>,
    /// The value of SendTargets (`All`, a target name, or empty), for the target role to answer.
    pub send_targets: Option<String>,
}

/// A negotiation failure. Messages name keys, never values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiationError {
    /// The same key twice in one login, or twice in one text exchange (§6.2).
    #[error("key {key} negotiated more than once")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A key the peer's role may not send (e.g. TargetAlias from an initiator).
    #[error("key {key} may not be sent by the {peer:?}")]
    WrongSender {
        /// The key.
        key: &'static str,
        /// The role that sent it.
        peer: Role,
    },
    /// A key not allowed in this stage (e.g. MaxConnections in full feature phase, CHAP_A in
    /// the operational stage, SendTargets during login).
    #[error("key {key} is not allowed in the {stage:?} stage")]
    WrongPhase {
        /// The key.
        key: &'static str,
        /// The stage it arrived in.
        stage: Stage,
    },
    /// A leading-only key on a non-leading connection.
    #[error("key {key} is allowed on the leading connection only")]
    LeadingOnly {
        /// The key.
        key: &'static str,
    },
    /// A declared value outside the key's admissible values.
    #[error("invalid value for key {key}")]
    InvalidValue {
        /// The key.
        key: &'static str,
    },
    /// A key the initiator must send in its first Login Request is missing.
    #[error("missing key {key}")]
    MissingParameter {
        /// The key.
        key: &'static str,
    },
    /// (Originator) an answer that violates the key's result function or range.
    #[error("answer for key {key} violates its result function")]
    InvalidAnswer {
        /// The key.
        key: &'static str,
    },
}

impl NegotiationError {
    /// The login status a target sends when the initiator caused this error:
    /// [`STATUS_MISSING_PARAMETER`] for a missing key, [`STATUS_INITIATOR_ERROR`] otherwise.
    /// (On the initiator side the target is at fault and the initiator drops the connection.)
    pub fn login_status(&self) -> u16 {
        match self {
            NegotiationError::MissingParameter { .. } => STATUS_MISSING_PARAMETER,
            _ => STATUS_INITIATOR_ERROR,
        }
    }
}

/// The negotiation state of one side for one connection's login, and afterwards for text
/// negotiations in full feature phase.
///
/// A target uses [`respond`](Self::respond) for each Login or Text Request. An initiator uses
/// [`offers`](Self::offers) to build each Login Request's keys and
/// [`accept_answers`](Self::accept_answers) for each Login Response. Both read
/// [`params`](Self::params) when login completes.
#[derive(Clone, Debug)]
pub struct Negotiation {
    role: Role,
    config: NegotiationConfig,
    /// Outcomes of negotiated keys and the peer's declarations, canonical wire form.
    results: BTreeMap<&'static str, String>,
    /// Our own declarations that went on the wire.
    own: BTreeMap<&'static str, String>,
    /// Our offers still waiting for an answer, with the value offered.
    offered: BTreeMap<&'static str, String>,
    /// Keys received from the peer during login.
    seen: BTreeSet<String>,
    first_pdu_done: bool,
    operational_done: bool,
}

impl Negotiation {
    /// A fresh negotiation for one connection's login.
    pub fn new(role: Role, config: NegotiationConfig) -> Self {
        Negotiation {
            role,
            config,
            results: BTreeMap::new(),
            own: BTreeMap::new(),
            offered: BTreeMap::new(),
            seen: BTreeSet::new(),
            first_pdu_done: false,
            operational_done: false,
        }
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The configuration this negotiation was built with.
    pub fn config(&self) -> &NegotiationConfig {
        &self.config
    }

    /// The current value of a key: negotiated outcome, peer's declaration, our declaration, or
    /// the RFC default.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.results
            .get(key)
            .or_else(|| self.own.get(key))
            .map(String::as_str)
            .or_else(|| lookup(key).and_then(|d| d.default))
    }

    /// The outcome of a negotiated key or the peer's declaration, if there was one.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// Keys we offered that were not answered. The answer is optional only for a BooleanAnd
    /// offered as `No` and a BooleanOr offered as `Yes`; those are not listed. A non-empty list
    /// at the end of login is a protocol error by the responder.
    pub fn unanswered(&self) -> Vec<&'static str> {
        self.offered
            .iter()
            .filter(|(k, v)| !Self::answer_optional(k, v))
            .map(|(k, _)| *k)
            .collect()
    }

    fn answer_optional(key: &str, offered: &str) -> bool {
        match lookup(key).map(|d| d.kind) {
            Some(KeyKind::BooleanAnd) => offered == "No",
            Some(KeyKind::BooleanOr) => offered == "Yes",
            _ => false,
        }
    }

    fn irrelevant(&self, def: &KeyDef) -> bool {
        def.irrelevant_when
            .iter()
            .any(|all| all.iter().all(|(k, v)| self.value(k) == Some(*v)))
    }

    fn local(&self, def: &KeyDef) -> Option<Local> {
        let local = (def.local)(&self.config, self.role)?;
        Some(match local {
            Local::Num(n) => Local::Num(def.clamp(n)),
            other => other,
        })
    }

    fn check_use(def: &KeyDef, stage: Stage, leading: bool) -> Result<(), NegotiationError> {
        let wrong = NegotiationError::WrongPhase {
            key: def.name,
            stage,
        };
        match (def.phase, stage) {
            (Phase::SecurityOnly, Stage::Security) | (Phase::Any, _) => Ok(()),
            (Phase::SecurityOnly, _) => Err(wrong),
            (Phase::FullFeatureOnly, Stage::FullFeature) => Ok(()),
            (Phase::FullFeatureOnly, _) => Err(wrong),
            (Phase::LoginOnly | Phase::LeadingOnly, Stage::FullFeature) => Err(wrong),
            (Phase::LeadingOnly, _) if !leading => {
                Err(NegotiationError::LeadingOnly { key: def.name })
            }
            (Phase::LoginOnly | Phase::LeadingOnly, _) => Ok(()),
        }
    }

    fn note_seen(
        &mut self,
        stage: Stage,
        per_call: &mut BTreeSet<String>,
        key: &str,
    ) -> Result<(), NegotiationError> {
        let fresh = if stage == Stage::FullFeature {
            per_call.insert(key.to_owned())
        } else {
            self.seen.insert(key.to_owned())
        };
        if fresh {
            Ok(())
        } else {
            Err(NegotiationError::DuplicateKey {
                key: key.to_owned(),
            })
        }
    }

    /// Computes the responder's answer to an offer of a negotiated key and records the outcome.
    fn answer_offer(&mut self, def: &'static KeyDef, offer: &str) -> String {
        if self.irrelevant(def) {
            return IRRELEVANT.to_owned();
        }
        let result = match (def.kind, self.local(def)) {
            (KeyKind::BooleanAnd | KeyKind::BooleanOr, Some(Local::Bool(ours))) => {
                match parse_bool(offer) {
                    Some(theirs) if def.kind == KeyKind::BooleanAnd => bool_str(theirs && ours),
                    Some(theirs) => bool_str(theirs || ours),
                    None => return REJECT.to_owned(),
                }
                .to_owned()
            }
            (KeyKind::NumericMin | KeyKind::NumericMax, Some(Local::Num(ours))) => {
                let (min, max) = def.numeric_bounds();
                let Some(theirs) = parse_numeric(offer).filter(|n| (min..=max).contains(n)) else {
                    return REJECT.to_owned();
                };
                let mut n = if def.kind == KeyKind::NumericMin {
                    theirs.min(ours)
                } else {
                    theirs.max(ours)
                };
                if let Some(cap) = def.not_above.and_then(|k| self.value(k)) {
                    if let Some(cap) = parse_numeric(cap) {
                        n = n.min(cap).max(min);
                    }
                }
                n.to_string()
            }
            (KeyKind::ListSelect, Some(Local::List(ours))) => {
                let allowed = match def.values {
                    ValueRange::List(l) => l,
                    _ => &[],
                };
                match offer
                    .split(',')
                    .find(|v| allowed.contains(v) && ours.contains(v))
                {
                    Some(v) => v.to_owned(),
                    None => return REJECT.to_owned(),
                }
            }
            // A negotiated key for which we have no value: we cannot take part.
            _ => return REJECT.to_owned(),
        };
        self.results.insert(def.name, result.clone());
        result
    }

    /// Records a declaration from the peer, validating it.
    fn accept_declaration(
        &mut self,
        def: &'static KeyDef,
        v: &str,
    ) -> Result<String, NegotiationError> {
        let canonical = def
            .check_declared(v)
            .ok_or(NegotiationError::InvalidValue { key: def.name })?;
        self.results.insert(def.name, canonical.clone());
        Ok(canonical)
    }

    /// Our declarations due now (see [`Announce`]), recorded as sent.
    fn due_declarations(&mut self, stage: Stage) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if stage == Stage::FullFeature {
            return out;
        }
        let first = !self.first_pdu_done;
        let operational = stage == Stage::Operational && !self.operational_done;
        self.first_pdu_done = true;
        if operational {
            self.operational_done = true;
        }
        for def in KEYS {
            let due = match def.announce {
                Announce::FirstPdu => first,
                Announce::Operational => operational,
                Announce::Never => false,
            };
            if !due || !def.kind.is_declarative() || !def.senders.allows(self.role) {
                continue;
            }
            if let Some(local) = self.local(def) {
                let v = local_to_wire(&local);
                self.own.insert(def.name, v.clone());
                out.push((def.name.to_owned(), v));
            }
        }
        out
    }

    /// Responder: processes the peer's `key=value` pairs of one Login or Text Request (already
    /// parsed with [`parse_text`]) and returns our answers.
    ///
    /// `stage` is the request's current stage, `leading` whether this connection is the
    /// session's leading connection. Unknown keys get `NotUnderstood`; keys irrelevant for the
    /// session get `Irrelevant`; unacceptable offers get `Reject`. Our declarations
    /// (TargetPortalGroupTag and TargetAlias in the first response, MaxRecvDataSegmentLength in
    /// the first operational-stage response) are appended once. AuthMethod and CHAP_* come back
    /// untouched in [`Response::auth_keys`].
    ///
    /// On the first login request, a target also checks that the initiator sent InitiatorName
    /// (and TargetName for a normal session).
    pub fn respond(
        &mut self,
        stage: Stage,
        leading: bool,
        offers: &[(String, String)],
    ) -> Result<Response, NegotiationError> {
        let mut resp = Response::default();
        let first = !self.first_pdu_done && stage != Stage::FullFeature;
        let peer = self.role.peer();
        let mut per_call = BTreeSet::new();
        let mut slots: Vec<Option<String>> = vec![None; offers.len()];
        let mut deferred = Vec::new();

        for (i, (k, v)) in offers.iter().enumerate() {
            self.note_seen(stage, &mut per_call, k)?;
            let Some(def) = lookup(k) else {
                if !is_special_value(v) {
                    slots[i] = Some(NOT_UNDERSTOOD.to_owned());
                }
                continue;
            };
            if !def.senders.allows(peer) {
                return Err(NegotiationError::WrongSender {
                    key: def.name,
                    peer,
                });
            }
            Self::check_use(def, stage, leading)?;
            match def.kind {
                KeyKind::Auth => resp.auth_keys.push((k.clone(), v.clone())),
                KeyKind::Request => resp.send_targets = Some(v.clone()),
                KeyKind::Obsolete { answer } => {
                    if !is_special_value(v) {
                        slots[i] = Some(answer.to_owned());
                    }
                }
                KeyKind::Declarative | KeyKind::NumericDeclarative => {
                    let canonical = self.accept_declaration(def, v)?;
                    match def.name {
                        "SessionType" => resp.session_type = SessionType::parse(&canonical),
                        "InitiatorName" => resp.initiator_name = Some(canonical),
                        "TargetName" => resp.target_name = Some(canonical),
                        _ => {}
                    }
                }
                _ if is_special_value(v) => {}
                _ if def.depends_on_others() => deferred.push((i, def, v)),
                _ => slots[i] = Some(self.answer_offer(def, v)),
            }
        }
        // Keys whose relevance or cap depends on other keys go after the keys of this batch.
        for (i, def, v) in deferred {
            slots[i] = Some(self.answer_offer(def, v));
        }

        if first && self.role == Role::Target {
            for def in KEYS {
                if let Some(conds) = def.required_when {
                    let needed = conds.iter().all(|(k, v)| self.value(k) == Some(*v));
                    if needed && !self.results.contains_key(def.name) {
                        return Err(NegotiationError::MissingParameter { key: def.name });
                    }
                }
            }
        }

        resp.answers = offers
            .iter()
            .zip(slots)
            .filter_map(|((k, _), a)| a.map(|a| (k.clone(), a)))
            .collect();
        let declarations = self.due_declarations(stage);
        resp.answers.extend(declarations);
        Ok(resp)
    }

    /// Originator: the keys to send in the next request of `stage`.
    ///
    /// The first call of a login returns our first-PDU declarations (InitiatorName,
    /// SessionType, TargetName, InitiatorAlias for an initiator). The first call in the
    /// operational stage adds every negotiable key this side announces — leading-only keys
    /// only when `leading`, keys irrelevant for the session left out — and our
    /// MaxRecvDataSegmentLength. Later calls return nothing new. The authentication layer adds
    /// AuthMethod / CHAP_* itself.
    pub fn offers(&mut self, stage: Stage, leading: bool) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if stage == Stage::Operational && !self.operational_done {
            // Our declarations and offers decide some conditions (SessionType, and the
            // InitialR2T/ImmediateData pair when they force the result); evaluate them as if
            // the peer agreed to our values.
            let mut assumed = self.own.clone();
            if self.role == Role::Initiator {
                assumed.insert("SessionType", self.config.session_type.as_str().to_owned());
            }
            for def in KEYS {
                if !def.kind.is_negotiated()
                    || def.announce != Announce::Operational
                    || !def.senders.allows(self.role)
                    || self.results.contains_key(def.name)
                    || (def.phase == Phase::LeadingOnly && !leading)
                {
                    continue;
                }
                let Some(local) = self.local(def) else {
                    continue;
                };
                assumed.insert(def.name, local_to_wire(&local));
                let irrelevant = def.irrelevant_when.iter().any(|all| {
                    all.iter().all(|(k, v)| {
                        assumed
                            .get(k)
                            .map(String::as_str)
                            .or_else(|| lookup(k).and_then(|d| d.default))
                            == Some(*v)
                    })
                });
                if irrelevant {
                    continue;
                }
                let v = local_to_wire(&local);
                self.offered.insert(def.name, v.clone());
                out.push((def.name.to_owned(), v));
            }
        }
        let mut declarations = self.due_declarations(stage);
        declarations.extend(out);
        declarations
    }

    /// Originator: processes the responder's keys from one Login or Text Response.
    ///
    /// Answers to our offers are checked against the result function (a `Reject`,
    /// `Irrelevant` or `NotUnderstood` answer leaves the key at its default); the peer's
    /// declarations are recorded. Returns the keys we must send back: answers to offers the
    /// responder made on its own, and `NotUnderstood` for unknown keys. AuthMethod and CHAP_*
    /// are skipped: the caller hands them to [`crate::chap::InitiatorChap`].
    pub fn accept_answers(
        &mut self,
        stage: Stage,
        answers: &[(String, String)],
    ) -> Result<Vec<(String, String)>, NegotiationError> {
        let peer = self.role.peer();
        let mut per_call = BTreeSet::new();
        let mut reply = Vec::new();
        let mut deferred = Vec::new();
        for (k, v) in answers {
            self.note_seen(stage, &mut per_call, k)?;
            let Some(def) = lookup(k) else {
                if !is_special_value(v) {
                    reply.push((k.clone(), NOT_UNDERSTOOD.to_owned()));
                }
                continue;
            };
            if !def.senders.allows(peer) {
                return Err(NegotiationError::WrongSender {
                    key: def.name,
                    peer,
                });
            }
            if def.kind != KeyKind::Auth {
                // Whether this is the leading connection is not known here; a target does not
                // send leading-only keys on a secondary connection unprompted.
                Self::check_use(def, stage, true)?;
            }
            match def.kind {
                KeyKind::Auth => {}
                KeyKind::Request => {}
                KeyKind::Declarative | KeyKind::NumericDeclarative => {
                    if !is_special_value(v) {
                        self.accept_declaration(def, v)?;
                    }
                }
                KeyKind::Obsolete { answer } => {
                    if !is_special_value(v) {
                        reply.push((k.clone(), answer.to_owned()));
                    }
                }
                _ => {
                    if let Some(ours) = self.offered.remove(def.name) {
                        self.check_answer(def, &ours, v)?;
                    } else if !is_special_value(v) {
                        // The responder opened a negotiation of its own: answer it.
                        if def.depends_on_others() {
                            deferred.push((k, v, def));
                        } else {
                            let a = self.answer_offer(def, v);
                            reply.push((k.clone(), a));
                        }
                    }
                }
            }
        }
        for (k, v, def) in deferred {
            let a = self.answer_offer(def, v);
            reply.push((k.clone(), a));
        }
        Ok(reply)
    }

    fn check_answer(
        &mut self,
        def: &'static KeyDef,
        ours: &str,
        answer: &str,
    ) -> Result<(), NegotiationError> {
        if is_special_value(answer) {
            // The key keeps its default.
            return Ok(());
        }
        let bad = NegotiationError::InvalidAnswer { key: def.name };
        let canonical = match def.kind {
            KeyKind::BooleanAnd | KeyKind::BooleanOr => {
                let a = parse_bool(answer).ok_or(bad.clone())?;
                let o = parse_bool(ours).ok_or(bad.clone())?;
                // AND: an offered No cannot become Yes; OR: an offered Yes cannot become No.
                if (def.kind == KeyKind::BooleanAnd && !o && a)
                    || (def.kind == KeyKind::BooleanOr && o && !a)
                {
                    return Err(bad);
                }
                bool_str(a).to_owned()
            }
            KeyKind::NumericMin | KeyKind::NumericMax => {
                let (min, max) = def.numeric_bounds();
                let a = parse_numeric(answer)
                    .filter(|n| (min..=max).contains(n))
                    .ok_or(bad.clone())?;
                let o = parse_numeric(ours).ok_or(bad.clone())?;
                if (def.kind == KeyKind::NumericMin && a > o)
                    || (def.kind == KeyKind::NumericMax && a < o)
                {
                    return Err(bad);
                }
                a.to_string()
            }
            KeyKind::ListSelect => {
                if answer.contains(',') || !ours.split(',').any(|o| o == answer) {
                    return Err(bad);
                }
                answer.to_owned()
            }
            _ => return Err(bad),
        };
        self.results.insert(def.name, canonical);
        Ok(())
    }

    /// The parameters in force: RFC defaults, overridden by our declarations, the peer's
    /// declarations and the negotiated outcomes. FirstBurstLength is capped at MaxBurstLength.
    pub fn params(&self) -> SessionParams {
        let mut p = SessionParams::default();
        for (k, v) in &self.own {
            if let Some(def) = lookup(k) {
                (def.apply)(&mut p, v, false);
            }
        }
        // Offers whose outcome is fixed whether or not they were answered.
        for (k, v) in &self.offered {
            if Self::answer_optional(k, v) {
                if let Some(def) = lookup(k) {
                    (def.apply)(&mut p, v, true);
                }
            }
        }
        for (k, v) in &self.results {
            if let Some(def) = lookup(k) {
                (def.apply)(&mut p, v, true);
            }
        }
        p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
        p
    }
}

fn local_to_wire(local: &Local) -> String {
    match local {
        Local::Bool(b) => bool_str(*b).to_owned(),
        Local::Num(n) => n.to_string(),
        Local::List(l) => l.join(","),
        Local::Text(t) => t.clone(),
    }
}

#[cfg(test)]
mod tests;
