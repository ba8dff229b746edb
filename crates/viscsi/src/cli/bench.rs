//! `viscsi bench URL`: a closed-loop load on one LUN — `--qd` workers, each issuing its next
//! READ (16) or WRITE (16) as soon as the previous one completes — for `--time`, then IOPS,
//! MiB/s, latency percentiles, the CPU this process used and the session's recoveries.
//!
//! With `--hba SOCKET` the load goes through a virtual function of the reference offload
//! adapter (`viscsi hba serve`): the bench programs a VF with its identity and submits the
//! same commands through the adapter driver's data path instead of its own session.
//!
//! Each worker keeps its own latency histogram (merged at the end), so measuring costs two
//! clock reads per I/O and no shared state. Writes send one random buffer made at start-up,
//! shared by reference. Random offsets come from a fixed-seed xorshift per worker, so runs
//! are repeatable; sequential workloads share one counter and wrap at the end of the range.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use datapath::{Adapter, DataPath};
use initiator::url::IscsiUrl;
use initiator::{Capacity, Digest, Session};

use super::cpu::CpuTime;
use super::histogram::Histogram;
use super::units::{human_bytes, mib_per_sec, parse_duration, parse_size};
use super::{close, describe_error, ConnectArgs, Connection};

/// What the workers do.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Reads at random block-size-aligned offsets.
    Randread,
    /// Writes at random block-size-aligned offsets.
    Randwrite,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
        }
    }

    fn writes(self) -> bool {
        matches!(self, Workload::Write | Workload::Randwrite)
    }

    fn random(self) -> bool {
        matches!(self, Workload::Randread | Workload::Randwrite)
    }
}

/// `viscsi bench` flags.
#[derive(Args)]
pub struct BenchArgs {
    /// iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN (writes destroy its data).
    #[arg(value_name = "URL")]
    url: String,
    /// Workload.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Workload,
    /// Bytes per I/O (a multiple of the LUN's block size), e.g. 4k or 1M.
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// I/Os in flight (one worker each).
    #[arg(long, value_name = "N", default_value_t = 32)]
    qd: usize,
    /// How long to run, e.g. 10s.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    time: Duration,
    /// Only use the first SIZE bytes of the LUN, e.g. 1G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Runtime threads (1: the session and the workers share one thread).
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// Run the load through a virtual function of the reference offload adapter listening
    /// on this socket (`viscsi hba serve`) instead of a session of this process.
    #[arg(long, value_name = "SOCKET")]
    hba: Option<PathBuf>,
    #[command(flatten)]
    connect: ConnectArgs,
}

impl BenchArgs {
    /// Runtime threads asked for.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

pub struct BenchConfig {
    connection: Connection,
    url: IscsiUrl,
    lun: u64,
    workload: Workload,
    io_bytes: u64,
    qd: usize,
    duration: Duration,
    range: Option<u64>,
    json: bool,
    hba: Option<PathBuf>,
}

/// Largest I/O accepted (the initiator negotiates bursts up to 16 MiB).
const MAX_IO: u64 = 16 << 20;

impl TryFrom<BenchArgs> for BenchConfig {
    type Error = String;
    fn try_from(a: BenchArgs) -> Result<Self, String> {
        if a.bs == 0 || a.bs > MAX_IO {
            return Err("--bs must be from 1 block to 16M".into());
        }
        if a.qd == 0 || a.qd > 4096 {
            return Err("--qd must be from 1 to 4096".into());
        }
        if a.time.is_zero() {
            return Err("--time must be more than 0".into());
        }
        if a.threads == 0 || a.threads > 64 {
            return Err("--threads must be from 1 to 64".into());
        }
        if a.size == Some(0) {
            return Err("--size must be more than 0".into());
        }
        let connection = Connection::try_from(a.connect)?;
        let url = connection.url(&a.url)?;
        let (_, lun) = url.require_lun().map_err(|e| e.to_string())?;
        Ok(BenchConfig {
            connection,
            url,
            lun,
            workload: a.rw,
            io_bytes: a.bs,
            qd: a.qd,
            duration: a.time,
            range: a.size,
            json: a.json,
            hba: a.hba,
        })
    }
}

/// What carries the I/O.
enum Io {
    /// A session of this process.
    Session(Session),
    /// A data path (a VF of the reference offload adapter).
    Path(Arc<dyn DataPath>),
}

/// What every worker shares.
struct Plan {
    io: Io,
    lun: u64,
    block_size: u32,
    blocks_per_io: u32,
    /// Number of I/O-sized slots in the range.
    slots: u64,
    workload: Workload,
    pattern: Bytes,
    deadline: Instant,
    next_sequential: AtomicU64,
    stop: AtomicBool,
}

/// xorshift64*: fast, good enough to spread offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn random_pattern(len: usize) -> Bytes {
    let mut rng = Rng(0x5eed_f00d_1234_5678);
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&rng.next().to_le_bytes());
    }
    data.truncate(len);
    Bytes::from(data)
}

async fn worker(plan: Arc<Plan>, id: u64) -> Result<Histogram, String> {
    let mut latencies = Histogram::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    while !plan.stop.load(Ordering::Relaxed) && Instant::now() < plan.deadline {
        let slot = if plan.workload.random() {
            rng.next() % plan.slots
        } else {
            plan.next_sequential.fetch_add(1, Ordering::Relaxed) % plan.slots
        };
        let lba = slot * u64::from(plan.blocks_per_io);
        let started = Instant::now();
        let want = u64::from(plan.blocks_per_io) * u64::from(plan.block_size);
        let result = match &plan.io {
            Io::Session(session) => session_io(&plan, session, lba).await,
            Io::Path(path) => path_io(&plan, path.as_ref(), lba).await,
        };
        let failed = match result {
            // The data stays in the Data-In segments it arrived in: only its length counts.
            Ok(read) if !plan.workload.writes() && read as u64 != want => Some(format!(
                "I/O at LBA {lba}: {read} bytes read instead of {want}"
            )),
            Ok(_) => None,
            Err(e) => Some(format!("I/O at LBA {lba}: {e}")),
        };
        if let Some(e) = failed {
            plan.stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
        latencies.record(started.elapsed().as_nanos() as u64);
    }
    Ok(latencies)
}

/// One I/O on the session; the bytes read.
async fn session_io(plan: &Plan, session: &Session, lba: u64) -> Result<usize, String> {
    let result = if plan.workload.writes() {
        session
            .write(plan.lun, lba, plan.pattern.clone(), plan.block_size)
            .await
            .map(|()| 0)
    } else {
        session
            .read_segments(plan.lun, lba, plan.blocks_per_io, plan.block_size)
            .await
            .map(|data| data.len())
    };
    result.map_err(|e| describe_error(&e))
}

/// READ (16) or WRITE (16) through a data path, retried on UNIT ATTENTION as the session's
/// helpers do; the bytes read.
async fn path_io(plan: &Plan, path: &dyn DataPath, lba: u64) -> Result<usize, String> {
    let mut cdb = [0u8; 16];
    cdb[0] = if plan.workload.writes() { 0x8a } else { 0x88 };
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&plan.blocks_per_io.to_be_bytes());
    let command = datapath::Command {
        lun: scsi::lun::encode(plan.lun),
        cdb: Bytes::copy_from_slice(&cdb),
        data_out: plan.pattern.clone(),
        read_len: if plan.workload.writes() {
            0
        } else {
            plan.blocks_per_io * plan.block_size
        },
        attr: datapath::TaskAttr::Simple,
    };
    for _ in 0..8 {
        let c = path
            .submit(command.clone())
            .await
            .map_err(|e| e.to_string())?;
        if c.status == datapath::Status::GOOD {
            return Ok(c.data.len());
        }
        let unit_attention = c.status == datapath::Status::CHECK_CONDITION
            && scsi::sense::Sense::parse(&c.sense)
                .is_some_and(|s| s.key == scsi::SenseKey::UNIT_ATTENTION);
        if !unit_attention {
            return Err(format!("SCSI {:?}", c.status));
        }
    }
    Err("unit attentions do not stop".into())
}

/// The bench's identity as an initiator client for the offload adapter (CHAP secrets as
/// values: the adapter reads nothing of this host).
fn offload_client(config: &BenchConfig) -> Result<datapath::InitiatorClient, String> {
    let target = config.url.require_target().map_err(|e| e.to_string())?;
    let o = config.connection.session_options(&config.url, target);
    let mut client =
        datapath::InitiatorClient::new_for_vm("bench", vec![o.portal.clone()], target.into());
    client.initiator_name = o.identity.initiator_name.clone();
    client.alias = o.identity.alias.clone();
    client.isid = format!("{:012x}", o.identity.isid.0);
    let names = |d: &[Digest]| {
        d.iter()
            .map(|d| match d {
                Digest::None => "none".to_string(),
                Digest::Crc32c => "crc32c".to_string(),
            })
            .collect::<Vec<_>>()
    };
    client.session.header_digest = names(&o.negotiation.header_digest);
    client.session.data_digest = names(&o.negotiation.data_digest);
    let ms = |d: Duration| d.as_millis() as u64;
    client.recovery.connect_timeout_ms = ms(o.policy.connect_timeout);
    client.recovery.login_timeout_ms = ms(o.policy.login_timeout);
    client.recovery.nop_interval_ms = o.policy.nop_interval.map_or(0, ms);
    client.recovery.nop_timeout_ms = ms(o.policy.nop_timeout);
    client.recovery.give_up_after_ms = o.policy.give_up_after.map_or(0, ms);
    if let Some(chap) = &o.chap {
        let text = |c: &initiator::Credentials| {
            String::from_utf8(c.secret.expose().to_vec())
                .map(datapath::Secret::Value)
                .map_err(|_| "--hba needs CHAP secrets that are UTF-8 text".to_string())
        };
        client.chap = Some(datapath::ChapSettings {
            user: chap.credentials.user.clone(),
            secret: text(&chap.credentials)?,
            target_user: chap.target.as_ref().map(|t| t.user.clone()),
            target_secret: chap.target.as_ref().map(text).transpose()?,
        });
    }
    client.validate().map_err(|e| e.to_string())?;
    Ok(client)
}

/// What a run measured.
struct Report {
    ios: u64,
    seconds: f64,
    latencies: Histogram,
    cpu: CpuTime,
    recoveries: u64,
    reissued: u64,
}

pub async fn run(config: BenchConfig) -> Result<(), String> {
    let session = config.connection.connect(&config.url).await?;
    let capacity = session
        .read_capacity(config.lun)
        .await
        .map_err(|e| format!("READ CAPACITY: {}", describe_error(&e)));
    let Some(socket) = &config.hba else {
        let result = match capacity {
            Ok(capacity) => measure(&config, Io::Session(session.clone()), capacity).await,
            Err(e) => Err(e),
        };
        close(&session).await;
        let report = result?;
        print_report(&config, &report, None);
        return Ok(());
    };
    // The adapter logs in with the same identity once this session is gone.
    close(&session).await;
    let capacity = capacity?;
    let client = offload_client(&config)?;
    let adapter = hba::driver::HbaAdapter::connect("hba", socket)
        .await
        .map_err(|e| e.to_string())?;
    let path = adapter
        .open(&client, None)
        .await
        .map_err(|e| format!("offload adapter: {e}"))?;
    let info = path.info();
    let result = measure(&config, Io::Path(path.clone()), capacity).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), path.close()).await;
    let report = result?;
    print_report(&config, &report, info.vf);
    Ok(())
}

async fn measure(config: &BenchConfig, io: Io, capacity: Capacity) -> Result<Report, String> {
    let bs = u64::from(capacity.block_size);
    if config.io_bytes % bs != 0 {
        return Err(format!(
            "--bs must be a multiple of the LUN's block size ({bs} bytes)"
        ));
    }
    let range = config.range.unwrap_or(u64::MAX).min(capacity.bytes());
    let slots = range / config.io_bytes;
    if slots == 0 {
        return Err(format!(
            "the range ({}) is smaller than one I/O ({})",
            human_bytes(range),
            human_bytes(config.io_bytes)
        ));
    }
    let pattern = if config.workload.writes() {
        random_pattern(config.io_bytes as usize)
    } else {
        Bytes::new()
    };
    let before = recoveries(&io);
    let cpu_before = CpuTime::now();
    let started = Instant::now();
    let plan = Arc::new(Plan {
        io,
        lun: config.lun,
        block_size: capacity.block_size,
        blocks_per_io: u32::try_from(config.io_bytes / bs).map_err(|_| "--bs too large")?,
        slots,
        workload: config.workload,
        pattern,
        deadline: started + config.duration,
        next_sequential: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let workers: Vec<_> = (0..config.qd as u64)
        .map(|id| tokio::spawn(worker(plan.clone(), id)))
        .collect();
    let mut latencies = Histogram::default();
    let mut first_error = None;
    for w in workers {
        match w.await {
            Ok(Ok(h)) => latencies.merge(&h),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    let wall = started.elapsed();
    let cpu = CpuTime::now().since(cpu_before);
    if let Some(e) = first_error {
        return Err(e);
    }
    let after = recoveries(&plan.io);
    Ok(Report {
        ios: latencies.count(),
        seconds: wall.as_secs_f64(),
        latencies,
        cpu,
        recoveries: after.0 - before.0,
        reissued: after.1 - before.1,
    })
}

/// Recoveries and re-issued commands so far.
fn recoveries(io: &Io) -> (u64, u64) {
    match io {
        Io::Session(s) => {
            let stats = s.stats();
            (stats.recoveries, stats.reissued)
        }
        Io::Path(p) => (p.stats().recoveries, 0),
    }
}

fn micros(nanos: u64) -> f64 {
    nanos as f64 / 1000.0
}

fn print_report(config: &BenchConfig, r: &Report, vf: Option<u32>) {
    let bytes = r.ios * config.io_bytes;
    let iops = if r.seconds > 0.0 {
        r.ios as f64 / r.seconds
    } else {
        0.0
    };
    let wall = Duration::from_secs_f64(r.seconds);
    let cpu_user = CpuTime::percent_of(r.cpu.user, wall);
    let cpu_system = CpuTime::percent_of(r.cpu.system, wall);
    let h = &r.latencies;
    if config.json {
        let value = serde_json::json!({
            "url": config.url.to_string(),
            "path": if config.hba.is_some() { "offload" } else { "software" },
            "vf": vf,
            "rw": config.workload.name(),
            "bs": config.io_bytes,
            "qd": config.qd,
            "seconds": r.seconds,
            "ios": r.ios,
            "bytes": bytes,
            "iops": iops,
            "mib_per_sec": mib_per_sec(bytes, r.seconds),
            "lat_mean_us": h.mean() / 1000.0,
            "lat_p50_us": micros(h.quantile(0.5)),
            "lat_p99_us": micros(h.quantile(0.99)),
            "lat_p999_us": micros(h.quantile(0.999)),
            "lat_max_us": micros(h.max()),
            "cpu_percent": cpu_user + cpu_system,
            "cpu_user_percent": cpu_user,
            "cpu_sys_percent": cpu_system,
            "recoveries": r.recoveries,
            "reissued": r.reissued,
        });
        println!("{value}");
        return;
    }
    let via = match (&config.hba, vf) {
        (Some(socket), Some(vf)) => format!(" via VF {vf} of the adapter at {}", socket.display()),
        _ => String::new(),
    };
    println!(
        "{} {} QD{} for {:.1} s on {}{via}",
        config.workload.name(),
        human_bytes(config.io_bytes),
        config.qd,
        r.seconds,
        config.url
    );
    println!("  IOPS        {iops:.0} ({} I/Os)", r.ios);
    println!(
        "  throughput  {:.1} MiB/s ({})",
        mib_per_sec(bytes, r.seconds),
        human_bytes(bytes)
    );
    println!(
        "  latency µs  p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        micros(h.quantile(0.5)),
        micros(h.quantile(0.99)),
        micros(h.quantile(0.999)),
        micros(h.max()),
        h.mean() / 1000.0
    );
    println!(
        "  CPU         {:.0} % of a core (user {cpu_user:.0} %, system {cpu_system:.0} %)",
        cpu_user + cpu_system
    );
    println!(
        "  recoveries  {} ({} commands re-issued)",
        r.recoveries, r.reissued
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_made_once_and_looks_random() {
        let p = random_pattern(4096);
        assert_eq!(p.len(), 4096);
        let zeros = p.iter().filter(|&&b| b == 0).count();
        assert!(zeros < 64, "{zeros} zero bytes");
        assert_eq!(random_pattern(10), p.slice(..10));
    }

    #[test]
    fn random_offsets_spread() {
        let mut rng = Rng(42);
        let mut seen = [0u32; 16];
        for _ in 0..16_000 {
            seen[(rng.next() % 16) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}
