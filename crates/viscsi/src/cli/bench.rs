//! `viscsi bench URL`: a closed-loop load on one LUN — `--qd` workers, each issuing its next
//! READ (16) or WRITE (16) as soon as the previous one completes — for `--time`, then IOPS,
//! MiB/s, latency percentiles, the CPU this process used and the session's recoveries.
//!
//! With `--hba SOCKET` the load goes through a virtual function of the reference offload
//! adapter (`viscsi hba serve`): the bench programs a VF with its identity and submits the
//! same commands through the adapter driver's data path instead of its own session.
//!
//! With `--vhost SOCKET` the load goes to a vhost-user-scsi or vhost-user-blk back end (the
//! agent's per-VM socket, or qemu-storage-daemon) through this process acting as the VMM
//! (`vhost_driver::Driver`): one thread keeps `--qd` requests on the first request queue,
//! reaping completions from the used ring and resubmitting at once. The URL is then optional;
//! the capacity comes from READ CAPACITY (16) through the driver (scsi) or the virtio-blk
//! config space (blk). Data buffers are preallocated in the shared guest memory (writes send
//! whatever those buffers hold).
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
    /// iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN (writes destroy its data);
    /// optional with --vhost.
    #[arg(value_name = "URL", required_unless_present = "vhost")]
    url: Option<String>,
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
    #[arg(long, value_name = "SOCKET", conflicts_with = "vhost")]
    hba: Option<PathBuf>,
    /// Run the load through a vhost-user back end listening on this socket, this process
    /// playing the VMM.
    #[arg(long, value_name = "SOCKET")]
    vhost: Option<PathBuf>,
    /// The vhost-user device type behind --vhost.
    #[arg(long, value_enum, default_value = "scsi", requires = "vhost")]
    vhost_kind: VhostKind,
    /// The virtio-scsi LUN (target 0) for --vhost-kind scsi.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "vhost")]
    vhost_lun: u16,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The device type behind `--vhost`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum VhostKind {
    /// vhost-user-scsi: READ (16) / WRITE (16) on a LUN.
    Scsi,
    /// vhost-user-blk: VIRTIO_BLK_T_IN / T_OUT.
    Blk,
}

/// Where `--vhost` sends the load.
struct VhostTarget {
    socket: PathBuf,
    kind: VhostKind,
    lun: u16,
}

impl BenchArgs {
    /// Runtime threads asked for.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

pub struct BenchConfig {
    connection: Connection,
    /// None only with --vhost.
    url: Option<IscsiUrl>,
    lun: u64,
    workload: Workload,
    io_bytes: u64,
    qd: usize,
    duration: Duration,
    range: Option<u64>,
    json: bool,
    hba: Option<PathBuf>,
    vhost: Option<VhostTarget>,
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
        let (url, lun) = match &a.url {
            Some(text) => {
                let url = connection.url(text)?;
                let (_, lun) = url.require_lun().map_err(|e| e.to_string())?;
                (Some(url), lun)
            }
            None => (None, 0),
        };
        let vhost = a.vhost.map(|socket| VhostTarget {
            socket,
            kind: a.vhost_kind,
            lun: a.vhost_lun,
        });
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
            vhost,
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
    let url = config.url.as_ref().ok_or("--hba needs a URL")?;
    let target = url.require_target().map_err(|e| e.to_string())?;
    let o = config.connection.session_options(url, target);
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
    if config.vhost.is_some() {
        let config = Arc::new(config);
        let c = config.clone();
        let report = tokio::task::spawn_blocking(move || vhost::measure(&c))
            .await
            .map_err(|e| format!("vhost bench thread: {e}"))??;
        print_report(&config, &report, None);
        return Ok(());
    }
    let url = config
        .url
        .as_ref()
        .ok_or("a URL is needed without --vhost")?;
    let session = config.connection.connect(url).await?;
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
    let url = config.url.as_ref().map(|u| u.to_string());
    let path = match &config.vhost {
        Some(v) if v.kind == VhostKind::Scsi => "vhost-scsi",
        Some(_) => "vhost-blk",
        None if config.hba.is_some() => "offload",
        None => "software",
    };
    if config.json {
        let value = serde_json::json!({
            "url": url,
            "socket": config.vhost.as_ref().map(|v| v.socket.display().to_string()),
            "path": path,
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
    let via = match (&config.hba, vf, &config.vhost) {
        (Some(socket), Some(vf), _) => {
            format!(" via VF {vf} of the adapter at {}", socket.display())
        }
        (_, _, Some(v)) => format!(" via {path} at {}", v.socket.display()),
        _ => String::new(),
    };
    let on = match (&url, &config.vhost) {
        (Some(url), _) => url.clone(),
        (None, Some(v)) if v.kind == VhostKind::Scsi => format!("LUN {}", v.lun),
        _ => "the disk".to_string(),
    };
    println!(
        "{} {} QD{} for {:.1} s on {on}{via}",
        config.workload.name(),
        human_bytes(config.io_bytes),
        config.qd,
        r.seconds,
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

/// The load through a vhost-user back end, this process playing the VMM.
mod vhost {
    use std::time::{Duration, Instant};

    use vhost_driver::wire::blk;
    use vhost_driver::{DeviceKind, Driver, DriverOptions};

    use super::{BenchConfig, CpuTime, Histogram, Report, Rng, VhostKind};
    use crate::cli::units::human_bytes;

    /// Guest memory besides the data slots (rings, headers, READ CAPACITY).
    const SPARE_MEMORY: u64 = 16 << 20;

    /// How to address the device: LBA size and how to build a request.
    struct Disk {
        block_size: u32,
        blocks: u64,
    }

    fn options(config: &BenchConfig, kind: VhostKind) -> Result<DriverOptions, String> {
        let qd = config.qd as u64;
        // Three descriptors per request (header, data, response/status).
        let queue_size = (qd * 3).next_power_of_two().clamp(128, 32768) as u16;
        Ok(DriverOptions {
            kind: match kind {
                VhostKind::Scsi => DeviceKind::Scsi,
                VhostKind::Blk => DeviceKind::Blk,
            },
            request_queues: 1,
            queue_size,
            memory_bytes: qd
                .checked_mul(config.io_bytes.next_multiple_of(4096))
                .and_then(|m| m.checked_add(SPARE_MEMORY))
                .ok_or("--qd x --bs too large")?,
        })
    }

    /// READ CAPACITY (16), retried while the LUN reports UNIT ATTENTION.
    fn scsi_capacity(d: &mut Driver, lun: u16) -> Result<Disk, String> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        for _ in 0..8 {
            let r = d
                .scsi_command(lun, &cdb, &[], 32)
                .map_err(|e| format!("READ CAPACITY (16): {e}"))?;
            if r.response != 0 {
                return Err(format!(
                    "READ CAPACITY (16): virtio-scsi response {}",
                    r.response
                ));
            }
            if r.status == 0 && r.data.len() >= 12 {
                let last = u64::from_be_bytes(r.data[0..8].try_into().expect("8 bytes"));
                let block_size = u32::from_be_bytes(r.data[8..12].try_into().expect("4 bytes"));
                return Ok(Disk {
                    block_size,
                    blocks: last + 1,
                });
            }
            let unit_attention = r.status == 2 && sense_key(&r.sense) == Some(6);
            if !unit_attention {
                return Err(format!(
                    "READ CAPACITY (16): status {:#x}, sense {:02x?}",
                    r.status, r.sense
                ));
            }
        }
        Err("READ CAPACITY (16): unit attentions do not stop".into())
    }

    fn sense_key(sense: &[u8]) -> Option<u8> {
        match sense.first()? & 0x7f {
            0x70 | 0x71 => sense.get(2).map(|k| k & 0xf),
            0x72 | 0x73 => sense.get(1).map(|k| k & 0xf),
            _ => None,
        }
    }

    pub(super) fn measure(config: &BenchConfig) -> Result<Report, String> {
        let target = config.vhost.as_ref().expect("--vhost given");
        let mut d = Driver::connect(&target.socket, options(config, target.kind)?)
            .map_err(|e| format!("vhost-user {}: {e}", target.socket.display()))?;
        let disk = match target.kind {
            VhostKind::Scsi => scsi_capacity(&mut d, target.lun)?,
            VhostKind::Blk => {
                let c = d
                    .blk_config()
                    .map_err(|e| format!("virtio-blk config: {e}"))?;
                Disk {
                    block_size: 512,
                    blocks: c.capacity_sectors,
                }
            }
        };
        let bs = u64::from(disk.block_size);
        if bs == 0 || config.io_bytes % bs != 0 {
            return Err(format!(
                "--bs must be a multiple of the device's block size ({bs} bytes)"
            ));
        }
        let len = u32::try_from(config.io_bytes).map_err(|_| "--bs too large")?;
        let range = config
            .range
            .unwrap_or(u64::MAX)
            .min(disk.blocks.saturating_mul(bs));
        let slots = range / config.io_bytes;
        if slots == 0 {
            return Err(format!(
                "the range ({}) is smaller than one I/O ({})",
                human_bytes(range),
                human_bytes(config.io_bytes)
            ));
        }
        let blocks_per_io = config.io_bytes / bs;
        let writes = config.workload.writes();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut next_sequential = 0u64;
        let mut next_slot = || {
            let slot = if config.workload.random() {
                rng.next() % slots
            } else {
                let s = next_sequential % slots;
                next_sequential += 1;
                s
            };
            slot * blocks_per_io
        };
        let submit = |d: &mut Driver, id: u64, lba: u64| match target.kind {
            VhostKind::Scsi => {
                let mut cdb = [0u8; 16];
                cdb[0] = if writes { 0x8a } else { 0x88 };
                cdb[2..10].copy_from_slice(&lba.to_be_bytes());
                cdb[10..14].copy_from_slice(&(blocks_per_io as u32).to_be_bytes());
                let (out, inn) = if writes { (len, 0) } else { (0, len) };
                d.submit_scsi(0, id, target.lun, &cdb, out, inn)
            }
            VhostKind::Blk => {
                let t = if writes { blk::T_OUT } else { blk::T_IN };
                d.submit_blk(0, id, t, lba, len)
            }
        };

        let cpu_before = CpuTime::now();
        let started = Instant::now();
        let deadline = started + config.duration;
        let mut issued_at = vec![started; config.qd];
        let mut latencies = Histogram::default();
        let mut in_flight = 0usize;
        // Like a guest's block layer: a batch of submissions, then one kick.
        d.set_batching(true);
        for (id, at) in issued_at.iter_mut().enumerate() {
            *at = Instant::now();
            submit(&mut d, id as u64, next_slot()).map_err(|e| format!("submit: {e}"))?;
            in_flight += 1;
        }
        d.kick().map_err(|e| format!("kick: {e}"))?;
        let mut stopping = false;
        while in_flight > 0 {
            let done = d
                .reap(Duration::from_secs(10))
                .map_err(|e| format!("reap: {e}"))?;
            if done.is_empty() {
                return Err(format!("{in_flight} requests did not complete within 10 s"));
            }
            let now = Instant::now();
            stopping |= now >= deadline;
            for c in done {
                in_flight -= 1;
                let id = c.id as usize;
                if c.status != 0 || c.response != 0 {
                    return Err(format!(
                        "I/O failed: status {:#x}, response {}",
                        c.status, c.response
                    ));
                }
                latencies.record(now.duration_since(issued_at[id]).as_nanos() as u64);
                if !stopping {
                    issued_at[id] = Instant::now();
                    submit(&mut d, c.id, next_slot()).map_err(|e| format!("submit: {e}"))?;
                    in_flight += 1;
                }
            }
            d.kick().map_err(|e| format!("kick: {e}"))?;
        }
        let wall = started.elapsed();
        let cpu = CpuTime::now().since(cpu_before);
        d.disconnect();
        Ok(Report {
            ios: latencies.count(),
            seconds: wall.as_secs_f64(),
            latencies,
            cpu,
            recoveries: 0,
            reissued: 0,
        })
    }
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
