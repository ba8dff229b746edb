//! The initiator's subcommands: `discover`, `ls`, `inquiry`, `cp` and `bench`.
//!
//! Each subcommand's flags are parsed by clap into an `…Args` struct, turned into a validated
//! configuration (`TryFrom`), then run on a tokio runtime built here. Everything that reaches
//! the user is one line: errors come back as `String`s that `main` prints as `viscsi: …`, and
//! secrets never appear in them (URLs are shown through [`IscsiUrl`]'s redacting `Display`).
//!
//! Identity: every session logs in as `--initiator-name` + `--isid`, by default the same for
//! every run on this host. Two viscsi processes with the same identity on the same target
//! take the session from each other (the target reinstates it); give concurrent runs
//! different `--isid` values.

mod bench;
mod cp;
mod cpu;
mod discover;
mod histogram;
mod inquiry;
mod ls;
mod progress;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use initiator::url::{self, IscsiUrl};
use initiator::{
    Digest, DiscoveryOptions, Error as InitiatorError, Identity, Isid, RecoveryPolicy, Session,
    SessionOptions,
};

use units::parse_duration;

/// The initiator's subcommands (flattened into the binary's command list).
#[derive(Subcommand)]
pub enum InitiatorCommand {
    /// List the targets a portal offers (SendTargets discovery).
    Discover(discover::DiscoverArgs),
    /// List targets and their LUNs with type, vendor, product and size (like iscsi-ls -s).
    Ls(ls::LsArgs),
    /// Show a LUN's standard INQUIRY data or a VPD page.
    Inquiry(inquiry::InquiryArgs),
    /// Copy a whole LUN to a file, a file into a LUN, or a LUN into a LUN.
    Cp(cp::CpArgs),
    /// Measure IOPS, throughput, latency and CPU of reads or writes on a LUN.
    Bench(bench::BenchArgs),
}

impl InitiatorCommand {
    /// The log filter when `--log` is not given: only warnings, so a command's output is its
    /// result.
    pub const DEFAULT_LOG: &'static str = "warn";
}

/// Runs one initiator subcommand to completion on its own runtime.
pub fn run(command: InitiatorCommand) -> Result<(), String> {
    // By default one thread: the session's driver and its callers wake each other without
    // crossing threads, which measured faster on small machines than a work-stealing pool
    // (`bench --threads` compares); blocking file I/O goes to tokio's blocking pool.
    let threads = match &command {
        InitiatorCommand::Bench(a) => a.threads(),
        _ => 1,
    };
    let mut builder = if threads > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        match command {
            InitiatorCommand::Discover(a) => discover::run(a.try_into()?).await,
            InitiatorCommand::Ls(a) => ls::run(a.try_into()?).await,
            InitiatorCommand::Inquiry(a) => inquiry::run(a.try_into()?).await,
            InitiatorCommand::Cp(a) => cp::run(a.try_into()?).await,
            InitiatorCommand::Bench(a) => bench::run(a.try_into()?).await,
        }
    })
}

/// Prints a command-line parsing error as one line naming the flag (help and version are
/// printed whole) and gives the exit code.
pub fn report_usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
    }
    let rendered = e.render().to_string();
    // The first paragraph names the problem (and, for missing arguments, lists them on the
    // following lines); tips and usage follow after a blank line.
    let first: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = first.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!(
        "viscsi: {} (see --help)",
        url::redact_urls(line.trim_end_matches('.'))
    );
    ExitCode::from(2)
}

/// Who we are on the wire.
#[derive(Args, Clone)]
pub struct IdentityArgs {
    /// InitiatorName to log in as [default: iqn.2024-01.org.viscsi:HOSTNAME].
    #[arg(long, value_name = "IQN")]
    initiator_name: Option<String>,
    /// ISID (48-bit, hex): with the InitiatorName, the stable identity of this initiator port.
    #[arg(long, value_name = "HEX", default_value = "0x023d00000001", value_parser = parse_isid)]
    isid: Isid,
}

fn parse_isid(s: &str) -> Result<Isid, String> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let value = u64::from_str_radix(hex, 16)
        .map_err(|_| "expected up to 12 hex digits, e.g. 0x023d00000001".to_owned())?;
    if hex.is_empty() || value >> 48 != 0 {
        return Err("an ISID has 48 bits: at most 12 hex digits".into());
    }
    Ok(Isid(value))
}

/// `iqn.2024-01.org.viscsi:` + this host's name, reduced to the characters an IQN allows.
fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("iqn.2024-01.org.viscsi:{host}")
}

impl From<IdentityArgs> for Identity {
    fn from(a: IdentityArgs) -> Identity {
        Identity::new(
            a.initiator_name.unwrap_or_else(default_initiator_name),
            a.isid,
        )
    }
}

/// Flags every subcommand that logs in shares: identity, digests, CHAP secrets, recovery.
#[derive(Args, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    identity: IdentityArgs,
    /// Header digests to offer: none, crc32c, crc32c-none or none-crc32c (overrides the URL).
    #[arg(long, value_name = "LIST", value_parser = digest_flag)]
    header_digest: Option<DigestList>,
    /// Data digests to offer, as for --header-digest (overrides the URL).
    #[arg(long, value_name = "LIST", value_parser = digest_flag)]
    data_digest: Option<DigestList>,
    /// CHAP user name, for a URL without USER@.
    #[arg(long, value_name = "USER")]
    chap_user: Option<String>,
    /// File holding the CHAP secret (one trailing newline is ignored). Without it, a URL
    /// user without a password takes VISCSI_CHAP_PASSWORD or LIBISCSI_CHAP_PASSWORD.
    #[arg(long, value_name = "PATH")]
    chap_secret_file: Option<PathBuf>,
    /// The target's CHAP user for mutual CHAP, for a URL without target_user=.
    #[arg(long, value_name = "USER")]
    target_chap_user: Option<String>,
    /// File holding the secret the target must prove (mutual CHAP). Without it:
    /// VISCSI_CHAP_TARGET_PASSWORD or LIBISCSI_CHAP_TARGET_PASSWORD.
    #[arg(long, value_name = "PATH")]
    target_chap_secret_file: Option<PathBuf>,
    /// Idle time before a NOP-Out ping, e.g. 5s (0 disables pings).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    nop_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection counts as lost, e.g. 5s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    nop_timeout: Option<Duration>,
    /// Stop trying to recover a lost session after this long, e.g. 120s, or `never`.
    #[arg(long, value_name = "DURATION", value_parser = parse_give_up)]
    give_up_after: Option<GiveUp>,
    /// Bound on each TCP connect, e.g. 2s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
}

/// A digest preference list as one flag value (a newtype, so clap does not take the flag
/// for a repeatable one).
#[derive(Clone)]
struct DigestList(Vec<Digest>);

fn digest_flag(s: &str) -> Result<DigestList, String> {
    url::parse_digests(s, "digest list")
        .map(DigestList)
        .map_err(|e| e.to_string())
}

/// `--give-up-after`: a duration or never.
#[derive(Clone, Copy)]
struct GiveUp(Option<Duration>);

fn parse_give_up(s: &str) -> Result<GiveUp, String> {
    if s.eq_ignore_ascii_case("never") {
        return Ok(GiveUp(None));
    }
    parse_duration(s).map(|d| GiveUp(Some(d)))
}

/// [`ConnectArgs`] checked and read: secret files loaded, policy built.
pub struct Connection {
    pub identity: Identity,
    policy: RecoveryPolicy,
    header_digest: Option<Vec<Digest>>,
    data_digest: Option<Vec<Digest>>,
    chap_user: Option<String>,
    target_chap_user: Option<String>,
    secret: Option<Vec<u8>>,
    target_secret: Option<Vec<u8>>,
}

fn read_secret(path: &std::path::Path, flag: &str) -> Result<Vec<u8>, String> {
    let secret =
        url::read_secret_file(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if secret.is_empty() {
        return Err(format!("{flag} {}: the file is empty", path.display()));
    }
    Ok(secret)
}

impl TryFrom<ConnectArgs> for Connection {
    type Error = String;
    fn try_from(a: ConnectArgs) -> Result<Connection, String> {
        let mut policy = RecoveryPolicy::default();
        if let Some(d) = a.nop_interval {
            policy.nop_interval = (!d.is_zero()).then_some(d);
        }
        if let Some(d) = a.nop_timeout {
            if d.is_zero() {
                return Err("--nop-timeout must be more than 0".into());
            }
            policy.nop_timeout = d;
        }
        if let Some(GiveUp(d)) = a.give_up_after {
            policy.give_up_after = d;
        }
        if let Some(d) = a.connect_timeout {
            if d.is_zero() {
                return Err("--connect-timeout must be more than 0".into());
            }
            policy.connect_timeout = d;
        }
        let secret = match &a.chap_secret_file {
            Some(p) => Some(read_secret(p, "--chap-secret-file")?),
            None => None,
        };
        let target_secret = match &a.target_chap_secret_file {
            Some(p) => Some(read_secret(p, "--target-chap-secret-file")?),
            None => None,
        };
        Ok(Connection {
            identity: a.identity.into(),
            policy,
            header_digest: a.header_digest.map(|d| d.0),
            data_digest: a.data_digest.map(|d| d.0),
            chap_user: a.chap_user,
            target_chap_user: a.target_chap_user,
            secret,
            target_secret,
        })
    }
}

impl Connection {
    /// Parses a URL argument and completes its credentials: user flags where the URL has
    /// none, then secrets from the files, then from the environment (the URL's own password
    /// wins over both). Digest flags override the URL's.
    pub fn url(&self, text: &str) -> Result<IscsiUrl, String> {
        let mut u: IscsiUrl = text.parse().map_err(|e: url::UrlError| e.to_string())?;
        self.complete(&mut u)?;
        Ok(u)
    }

    /// A `host[:port]` or `iscsi://` argument naming a portal.
    pub fn portal_url(&self, text: &str) -> Result<IscsiUrl, String> {
        if url::is_iscsi_url(text) {
            return self.url(text);
        }
        let mut u = IscsiUrl::portal_only(text).map_err(|e| e.to_string())?;
        self.complete(&mut u)?;
        Ok(u)
    }

    fn complete(&self, u: &mut IscsiUrl) -> Result<(), String> {
        let has_user = |u: &IscsiUrl| {
            u.chap
                .as_ref()
                .is_some_and(|c| !c.credentials.user.is_empty())
        };
        if let Some(user) = &self.chap_user {
            if !has_user(u) || u.chap.as_ref().is_some_and(|c| &c.credentials.user == user) {
                u.set_user(user).map_err(|e| e.to_string())?;
            } else {
                return Err("--chap-user differs from the user in the URL".into());
            }
        }
        if let Some(user) = &self.target_chap_user {
            u.set_target_user(user).map_err(|e| e.to_string())?;
        }
        if let Some(secret) = &self.secret {
            match &u.chap {
                None => {
                    return Err(
                        "--chap-secret-file needs a CHAP user (USER@ in the URL or --chap-user)"
                            .into(),
                    )
                }
                Some(c) if c.credentials.secret.is_empty() => {
                    u.set_secret(secret.clone()).map_err(|e| e.to_string())?;
                }
                Some(_) => {} // the URL's password is more specific
            }
        }
        if let Some(secret) = &self.target_secret {
            match u.chap.as_ref().and_then(|c| c.target.as_ref()) {
                None => {
                    return Err("--target-chap-secret-file needs the target's CHAP user \
                                (target_user= in the URL or --target-chap-user)"
                        .into())
                }
                Some(t) if t.secret.is_empty() => {
                    u.set_target_secret(secret.clone())
                        .map_err(|e| e.to_string())?;
                }
                Some(_) => {}
            }
        }
        u.fill_secrets_from_env();
        u.check_credentials().map_err(|e| e.to_string())?;
        if let Some(d) = &self.header_digest {
            u.header_digest = Some(d.clone());
        }
        if let Some(d) = &self.data_digest {
            u.data_digest = Some(d.clone());
        }
        Ok(())
    }

    /// Session options for `target` at the URL's portal.
    pub fn session_options(&self, u: &IscsiUrl, target: &str) -> SessionOptions {
        let mut o = SessionOptions::new(self.identity.clone(), u.portal.clone(), target);
        o.chap = u.chap.clone();
        o.policy = self.policy.clone();
        if let Some(d) = &u.header_digest {
            o.negotiation.header_digest = d.clone();
        }
        if let Some(d) = &u.data_digest {
            o.negotiation.data_digest = d.clone();
        }
        o
    }

    /// Logs in to the URL's target.
    pub async fn connect(&self, u: &IscsiUrl) -> Result<Session, String> {
        let target = u.require_target().map_err(|e| e.to_string())?;
        Session::connect(self.session_options(u, target))
            .await
            .map_err(|e| describe_error(&e))
    }

    /// Discovery options for the URL's portal (same CHAP as its normal sessions).
    pub fn discovery_options(&self, u: &IscsiUrl) -> DiscoveryOptions {
        DiscoveryOptions {
            identity: self.identity.clone(),
            portal: u.portal.clone(),
            chap: u.chap.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// An initiator error as one line, with a hint for authentication failures.
pub fn describe_error(e: &InitiatorError) -> String {
    let text = e.to_string().replace('\n', " ");
    if e.is_auth() {
        format!("{text} (check the CHAP user and secret)")
    } else {
        text
    }
}

/// Logs out, ignoring failures: the work is done and the target may already be gone.
pub async fn close(session: &Session) {
    let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The subcommands alone, as `main` flattens them.
    #[derive(Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: InitiatorCommand,
    }

    const URL: &str = "iscsi://127.0.0.1/iqn.a/0";

    /// Every connection flag with a value, for each subcommand: catches definitions that
    /// parse but cannot be read back.
    #[test]
    fn every_flag_parses_and_validates() {
        let common = [
            "--initiator-name",
            "iqn.2024-01.test:x",
            "--isid",
            "0x1",
            "--header-digest",
            "crc32c-none",
            "--data-digest",
            "none",
            "--chap-user",
            "u",
            "--target-chap-user",
            "t",
            "--nop-interval",
            "0",
            "--nop-timeout",
            "2s",
            "--give-up-after",
            "never",
            "--connect-timeout",
            "500ms",
        ];
        let commands: [&[&str]; 5] = [
            &["discover", "127.0.0.1"],
            &["ls", URL],
            &["inquiry", URL, "--page", "0x83"],
            &[
                "cp",
                URL,
                "/tmp/x",
                "--qd",
                "4",
                "--chunk",
                "256k",
                "--progress",
            ],
            &[
                "bench",
                URL,
                "--rw",
                "randwrite",
                "--bs",
                "8k",
                "--qd",
                "2",
                "--time",
                "1s",
                "--size",
                "1M",
                "--json",
                "--threads",
                "2",
            ],
        ];
        for command in commands {
            let args: Vec<&str> = ["viscsi"]
                .iter()
                .chain(command)
                .chain(common.iter())
                .copied()
                .collect();
            let cli = TestCli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let InitiatorCommand::Ls(ls) = cli.command else {
                continue;
            };
            let connection = Connection::try_from(ls.connect).expect("valid flags");
            assert_eq!(
                connection.header_digest,
                Some(vec![Digest::Crc32c, Digest::None])
            );
            assert_eq!(connection.data_digest, Some(vec![Digest::None]));
            assert_eq!(connection.policy.nop_interval, None);
            assert_eq!(connection.policy.give_up_after, None);
            assert_eq!(connection.identity.isid, Isid(1));
            // The flags' users need secrets: none here, so the URL is incomplete.
            let err = connection.url(URL).expect_err("missing secret");
            assert!(err.contains("no CHAP password"), "{err}");
        }
    }

    #[test]
    fn isid_flag() {
        assert_eq!(
            parse_isid("0x023d00000001").unwrap(),
            Isid(0x023d_0000_0001)
        );
        assert_eq!(parse_isid("ABCDEF").unwrap(), Isid(0xab_cdef));
        assert!(parse_isid("0x1000000000000").is_err());
        assert!(parse_isid("").is_err());
        assert!(parse_isid("0x").is_err());
        assert!(parse_isid("zz").is_err());
    }

    #[test]
    fn default_name_is_an_iqn() {
        let name = default_initiator_name();
        assert!(name.starts_with("iqn.2024-01.org.viscsi:"), "{name}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-:".contains(c)));
    }
}
