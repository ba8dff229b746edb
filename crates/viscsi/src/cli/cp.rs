//! `viscsi cp SRC DST`: a whole LUN into a file, a file into a LUN, or a LUN into a LUN, with
//! several chunks in flight (like `qemu-img convert`).
//!
//! The copy is cut into `--chunk`-sized pieces; up to `--qd` of them are read and written
//! at once, each by its own task. Pieces finish in any order, which files and LUNs do not
//! mind (positional writes); standard output gets them in order through a sliding window.
//! A file that is not a whole number of blocks has its last block padded with zeros on the
//! LUN (and the command says so). Regular destination files end up exactly as long as the
//! data; LUN destinations get SYNCHRONIZE CACHE and files fdatasync at the end.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use clap::Args;
use initiator::url::{self, IscsiUrl};
use initiator::{DataIn, Session};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::progress::Progress;
use super::units::{human_bytes, mib_per_sec, parse_size};
use super::{close, describe_error, ConnectArgs, Connection};

/// `viscsi cp` flags.
#[derive(Args)]
pub struct CpArgs {
    /// Source: iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN, a file, or - (stdin).
    #[arg(value_name = "SRC")]
    src: String,
    /// Destination: a LUN URL, a file, or - (stdout).
    #[arg(value_name = "DST")]
    dst: String,
    /// Chunks in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    qd: usize,
    /// Chunk size (a multiple of the LUNs' block sizes), e.g. 1M or 256k.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    chunk: u64,
    /// Show a progress bar on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// One side of a copy, as given.
enum Spec {
    Lun(Box<IscsiUrl>),
    File(PathBuf),
    Stdio,
}

impl Spec {
    fn parse(text: &str, connection: &Connection, side: &str) -> Result<Spec, String> {
        if text == "-" {
            Ok(Spec::Stdio)
        } else if url::is_iscsi_url(text) {
            let u = connection.url(text)?;
            u.require_lun().map_err(|e| format!("{side}: {e}"))?;
            Ok(Spec::Lun(Box::new(u)))
        } else if text.is_empty() {
            Err(format!("{side} is empty"))
        } else {
            Ok(Spec::File(PathBuf::from(text)))
        }
    }

    /// Portal, target and LUN, for LUN sides.
    fn lun_key(&self) -> Option<(&str, &str, u64)> {
        match self {
            Spec::Lun(u) => Some((&u.portal, u.target.as_deref()?, u.lun?)),
            _ => None,
        }
    }
}

pub struct CpConfig {
    connection: Connection,
    src: Spec,
    dst: Spec,
    qd: usize,
    chunk: u64,
    progress: bool,
}

/// Chunk sizes accepted: from one 512-byte block to 64 MiB.
const MAX_CHUNK: u64 = 64 << 20;

impl TryFrom<CpArgs> for CpConfig {
    type Error = String;
    fn try_from(a: CpArgs) -> Result<Self, String> {
        if a.qd == 0 || a.qd > 1024 {
            return Err("--qd must be from 1 to 1024".into());
        }
        if a.chunk == 0 || a.chunk % 512 != 0 || a.chunk > MAX_CHUNK {
            return Err("--chunk must be a multiple of 512 bytes, at most 64M".into());
        }
        let connection = Connection::try_from(a.connect)?;
        let src = Spec::parse(&a.src, &connection, "SRC")?;
        let dst = Spec::parse(&a.dst, &connection, "DST")?;
        match (&src, &dst) {
            (Spec::Lun(_), _) | (_, Spec::Lun(_)) => {}
            _ => return Err("one of SRC and DST must be an iscsi:// URL with a LUN".into()),
        }
        if src.lun_key().is_some() && src.lun_key() == dst.lun_key() {
            return Err("SRC and DST are the same LUN".into());
        }
        Ok(CpConfig {
            connection,
            src,
            dst,
            qd: a.qd,
            chunk: a.chunk,
            progress: a.progress,
        })
    }
}

/// A LUN side, logged in and measured.
struct Lun {
    session: Session,
    lun: u64,
    block_size: u32,
    bytes: u64,
    shown: String,
}

impl Lun {
    async fn open(
        connection: &Connection,
        u: &IscsiUrl,
        reuse: Option<&Session>,
    ) -> Result<Lun, String> {
        let (_, lun) = u.require_lun().map_err(|e| e.to_string())?;
        let session = match reuse {
            Some(s) => s.clone(),
            None => connection.connect(u).await?,
        };
        let capacity = session
            .read_capacity(lun)
            .await
            .map_err(|e| format!("{u}: READ CAPACITY: {}", describe_error(&e)))?;
        Ok(Lun {
            session,
            lun,
            block_size: capacity.block_size,
            bytes: capacity.bytes(),
            shown: u.to_string(),
        })
    }

    /// Reads `len` bytes at `offset`, as the Data-In segments received (no copy).
    async fn read(&self, offset: u64, len: u64) -> Result<DataIn, String> {
        let bs = u64::from(self.block_size);
        let blocks = u32::try_from(len / bs).map_err(|_| "chunk too large".to_owned())?;
        let lba = offset / bs;
        let data = self
            .session
            .read_segments(self.lun, lba, blocks, self.block_size)
            .await
            .map_err(|e| {
                format!(
                    "reading {} at byte {offset}: {}",
                    self.shown,
                    describe_error(&e)
                )
            })?;
        if data.len() as u64 != len {
            return Err(format!(
                "reading {} at byte {offset}: {} bytes instead of {len}",
                self.shown,
                data.len()
            ));
        }
        Ok(data)
    }

    /// Writes `data` at `offset`, padding a partial last block with zeros.
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), String> {
        let bs = self.block_size as usize;
        let data = if data.len() % bs == 0 {
            data
        } else {
            let mut padded = BytesMut::with_capacity(data.len().next_multiple_of(bs));
            padded.extend_from_slice(&data);
            padded.resize(data.len().next_multiple_of(bs), 0);
            padded.freeze()
        };
        let lba = offset / bs as u64;
        self.session
            .write(self.lun, lba, data, self.block_size)
            .await
            .map_err(|e| {
                format!(
                    "writing {} at byte {offset}: {}",
                    self.shown,
                    describe_error(&e)
                )
            })
    }
}

enum Source {
    Lun(Arc<Lun>),
    File(Arc<File>),
    Stdin,
}

enum Sink {
    Lun(Arc<Lun>),
    File { file: Arc<File>, regular: bool },
    Stdout,
}

/// Size of an open file or block device (regular files by metadata, others by seeking).
fn file_size(file: &mut File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let end = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(end)
}

pub async fn run(config: CpConfig) -> Result<(), String> {
    let CpConfig {
        connection,
        src,
        dst,
        qd,
        chunk,
        progress,
    } = config;

    let mut sessions: Vec<Session> = Vec::new();
    let result = copy(&connection, &src, &dst, qd, chunk, progress, &mut sessions).await;
    for s in &sessions {
        close(s).await;
    }
    let summary = result?;
    let to_stderr = matches!(dst, Spec::Stdio);
    let line = format!(
        "copied {} bytes ({}) in {:.2} s, {:.1} MiB/s",
        summary.bytes,
        human_bytes(summary.bytes),
        summary.seconds,
        mib_per_sec(summary.bytes, summary.seconds)
    );
    if summary.padding > 0 {
        eprintln!(
            "viscsi: note: the last block on the LUN was padded with {} zero bytes",
            summary.padding
        );
    }
    if to_stderr {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(())
}

struct Summary {
    bytes: u64,
    seconds: f64,
    padding: u64,
}

async fn copy(
    connection: &Connection,
    src_spec: &Spec,
    dst_spec: &Spec,
    qd: usize,
    chunk: u64,
    show_progress: bool,
    sessions: &mut Vec<Session>,
) -> Result<Summary, String> {
    // Sources first: a LUN's size decides the destination file's length.
    let (src, total) = match src_spec {
        Spec::Lun(u) => {
            let lun = Lun::open(connection, u, None).await?;
            sessions.push(lun.session.clone());
            let total = lun.bytes;
            (Source::Lun(Arc::new(lun)), Some(total))
        }
        Spec::File(path) => {
            let mut file =
                File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let size =
                file_size(&mut file).map_err(|e| format!("cannot size {}: {e}", path.display()))?;
            (Source::File(Arc::new(file)), Some(size))
        }
        Spec::Stdio => (Source::Stdin, None),
    };
    let dst = match dst_spec {
        Spec::Lun(u) => {
            // The same target as the source: one session (a second login with our identity
            // would take the first one's place).
            let reuse = match (src_spec, &src) {
                (Spec::Lun(s), Source::Lun(l)) if s.portal == u.portal && s.target == u.target => {
                    Some(&l.session)
                }
                _ => None,
            };
            let lun = Lun::open(connection, u, reuse).await?;
            if reuse.is_none() {
                sessions.push(lun.session.clone());
            }
            Sink::Lun(Arc::new(lun))
        }
        Spec::File(path) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
            Sink::File {
                file: Arc::new(file),
                regular,
            }
        }
        Spec::Stdio => Sink::Stdout,
    };

    for (lun, side) in [(source_lun(&src), "SRC"), (sink_lun(&dst), "DST")] {
        if let Some(l) = lun {
            if chunk % u64::from(l.block_size) != 0 {
                return Err(format!(
                    "--chunk must be a multiple of the {side} LUN's block size ({} bytes)",
                    l.block_size
                ));
            }
        }
    }
    let capacity = match &dst {
        Sink::Lun(l) => Some(l.bytes),
        Sink::File {
            file,
            regular: false,
        } => {
            let mut f = file.try_clone().map_err(|e| e.to_string())?;
            Some(file_size(&mut f).map_err(|e| format!("cannot size DST: {e}"))?)
        }
        _ => None,
    };
    let block = sink_lun(&dst).map_or(1, |l| u64::from(l.block_size));
    if let (Some(total), Some(capacity)) = (total, capacity) {
        if total.next_multiple_of(block) > capacity {
            return Err(format!(
                "SRC ({total} bytes) does not fit in DST ({capacity} bytes)"
            ));
        }
    }
    if let (
        Sink::File {
            file,
            regular: true,
        },
        Some(total),
    ) = (&dst, total)
    {
        file.set_len(total)
            .map_err(|e| format!("cannot size the destination file: {e}"))?;
    }

    let started = Instant::now();
    let progress = Progress::start(total, show_progress);
    let copied = transfer(
        Arc::new(src),
        Arc::new(dst),
        total,
        capacity,
        qd,
        chunk,
        &progress,
    )
    .await;
    progress.finish();
    let (copied, dst) = copied?;

    match &*dst {
        Sink::Lun(l) => l
            .session
            .synchronize_cache(l.lun)
            .await
            .map_err(|e| format!("SYNCHRONIZE CACHE on {}: {}", l.shown, describe_error(&e)))?,
        Sink::File { file, regular } => {
            if *regular && total.is_none() {
                file.set_len(copied)
                    .map_err(|e| format!("cannot size the destination file: {e}"))?;
            }
            let file = file.clone();
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("flushing the destination file: {e}"))?;
        }
        Sink::Stdout => {}
    }
    Ok(Summary {
        bytes: copied,
        seconds: started.elapsed().as_secs_f64(),
        padding: copied.next_multiple_of(block) - copied,
    })
}

fn source_lun(s: &Source) -> Option<&Lun> {
    match s {
        Source::Lun(l) => Some(l),
        _ => None,
    }
}

fn sink_lun(s: &Sink) -> Option<&Lun> {
    match s {
        Sink::Lun(l) => Some(l),
        _ => None,
    }
}

/// Reads `len` bytes at `offset` from a random-access source.
async fn read_chunk(src: &Source, offset: u64, len: u64) -> Result<DataIn, String> {
    match src {
        Source::Lun(l) => l.read(offset, len).await,
        Source::File(f) => {
            let f = f.clone();
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset)
                    .map(|()| DataIn::from(buf))
                    .map_err(|e| format!("reading SRC at byte {offset}: {e}"))
            })
            .await
            .map_err(|e| e.to_string())?
        }
        Source::Stdin => Err("standard input is not seekable".into()),
    }
}

/// Writes a chunk to a random-access sink: a file gets the segments as they are, a LUN one
/// buffer (a copy only when the chunk came from a LUN in several Data-In PDUs).
async fn write_chunk(dst: &Sink, offset: u64, data: DataIn) -> Result<(), String> {
    match dst {
        Sink::Lun(l) => l.write(offset, data.into_bytes()).await,
        Sink::File { file, .. } => {
            let f = file.clone();
            tokio::task::spawn_blocking(move || {
                write_all_segments_at(&f, data.segments(), offset)
                    .map_err(|e| format!("writing DST at byte {offset}: {e}"))
            })
            .await
            .map_err(|e| e.to_string())?
        }
        Sink::Stdout => Err("standard output is not seekable".into()),
    }
}

/// Most iovecs in one `pwritev` (IOV_MAX on Linux).
const MAX_IOVECS: usize = 1024;

/// Writes `segments` one after the other at `offset`, with positional vectored writes (the
/// segments are never concatenated).
fn write_all_segments_at(file: &File, segments: &[Bytes], offset: u64) -> std::io::Result<()> {
    let mut left: Vec<&[u8]> = segments.iter().map(|b| &b[..]).collect();
    let mut first = 0;
    let mut at = offset;
    while first < left.len() {
        let iov: Vec<IoSlice<'_>> = left[first..]
            .iter()
            .take(MAX_IOVECS)
            .map(|s| IoSlice::new(s))
            .collect();
        let mut n = match rustix::io::pwritev(file, &iov, at) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += n as u64;
        // Skip what was written: whole segments, then the front of a partly written one.
        while n > 0 {
            let seg = left[first];
            if n >= seg.len() {
                n -= seg.len();
                first += 1;
            } else {
                left[first] = &seg[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// Chunks of standard input, read by a thread so the runtime never blocks on it.
fn spawn_stdin_reader(chunk: usize, depth: usize) -> mpsc::Receiver<Result<Bytes, String>> {
    let (tx, rx) = mpsc::channel(depth);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut buf = vec![0u8; chunk];
            let mut filled = 0;
            while filled < chunk {
                match stdin.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(format!("reading standard input: {e}")));
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            buf.truncate(filled);
            if tx.blocking_send(Ok(Bytes::from(buf))).is_err() || filled < chunk {
                return;
            }
        }
    });
    rx
}

/// A finished chunk: its length, and its data when it still has to go to standard output.
struct Done {
    len: u64,
    for_stdout: Option<DataIn>,
}

type Job = Result<Done, String>;

/// Chunks in flight: any order for seekable sinks, oldest first for standard output.
enum InFlight {
    Unordered(JoinSet<Job>),
    Ordered(VecDeque<JoinHandle<Job>>),
}

impl InFlight {
    fn len(&self) -> usize {
        match self {
            InFlight::Unordered(s) => s.len(),
            InFlight::Ordered(q) => q.len(),
        }
    }

    fn spawn(&mut self, job: impl std::future::Future<Output = Job> + Send + 'static) {
        match self {
            InFlight::Unordered(s) => {
                s.spawn(job);
            }
            InFlight::Ordered(q) => q.push_back(tokio::spawn(job)),
        }
    }

    /// Waits for one chunk (for standard output the oldest, which is then written out) and
    /// returns its length; None when nothing is in flight.
    async fn finish_one(&mut self) -> Result<Option<u64>, String> {
        let joined = match self {
            InFlight::Unordered(s) => match s.join_next().await {
                Some(j) => j,
                None => return Ok(None),
            },
            InFlight::Ordered(q) => match q.pop_front() {
                Some(h) => h.await,
                None => return Ok(None),
            },
        };
        let done = joined.map_err(|e| format!("copy task failed: {e}"))??;
        if let Some(data) = done.for_stdout {
            tokio::task::spawn_blocking(move || {
                let mut out = std::io::stdout().lock();
                data.iter()
                    .try_for_each(|segment| out.write_all(segment))
                    .and_then(|()| out.flush())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing standard output: {e}"))?;
        }
        Ok(Some(done.len))
    }

    fn abort(&mut self) {
        match self {
            InFlight::Unordered(s) => s.abort_all(),
            InFlight::Ordered(q) => q.iter().for_each(|h| h.abort()),
        }
    }
}

/// Moves every chunk from `src` to `dst` with up to `qd` in flight; returns the bytes copied
/// (and the sink, for the final flush).
async fn transfer(
    src: Arc<Source>,
    dst: Arc<Sink>,
    total: Option<u64>,
    capacity: Option<u64>,
    qd: usize,
    chunk: u64,
    progress: &Progress,
) -> Result<(u64, Arc<Sink>), String> {
    let mut in_flight = if matches!(*dst, Sink::Stdout) {
        InFlight::Ordered(VecDeque::new())
    } else {
        InFlight::Unordered(JoinSet::new())
    };
    let mut stdin = matches!(*src, Source::Stdin).then(|| spawn_stdin_reader(chunk as usize, qd));
    let mut offset = 0u64;
    let mut copied = 0u64;
    let result: Result<(), String> = async {
        loop {
            while in_flight.len() >= qd {
                if let Some(len) = in_flight.finish_one().await? {
                    copied += len;
                    progress.add(len);
                }
            }
            // The next chunk: its data already in hand for standard input.
            let (len, data) = match (&mut stdin, total) {
                (Some(rx), _) => match rx.recv().await {
                    Some(data) => {
                        let data = DataIn::from(data?);
                        (data.len() as u64, Some(data))
                    }
                    None => break,
                },
                (None, Some(total)) if offset < total => ((total - offset).min(chunk), None),
                _ => break,
            };
            if let Some(capacity) = capacity {
                if offset + len > capacity {
                    return Err(format!(
                        "the input is larger than the destination ({capacity} bytes)"
                    ));
                }
            }
            let (src, dst) = (src.clone(), dst.clone());
            let at = offset;
            in_flight.spawn(async move {
                let data = match data {
                    Some(d) => d,
                    None => read_chunk(&src, at, len).await?,
                };
                if matches!(*dst, Sink::Stdout) {
                    return Ok(Done {
                        len,
                        for_stdout: Some(data),
                    });
                }
                write_chunk(&dst, at, data).await?;
                Ok(Done {
                    len,
                    for_stdout: None,
                })
            });
            offset += len;
        }
        while let Some(len) = in_flight.finish_one().await? {
            copied += len;
            progress.add(len);
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        in_flight.abort();
        return Err(e);
    }
    Ok((copied, dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments land one after the other at the offset, around what the file held.
    #[test]
    fn segments_are_written_in_place() {
        let path = std::env::temp_dir().join(format!("viscsi-cp-segments-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&[0xee; 64], 0).unwrap();
        let whole: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let whole = Bytes::from(whole);
        let segments = [whole.slice(..1), whole.slice(1..4096), whole.slice(4096..)];
        write_all_segments_at(&file, &segments, 10).unwrap();
        let mut back = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut back).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.len(), 5010);
        assert_eq!(&back[..10], &[0xee; 10]);
        assert_eq!(&back[10..], &whole[..]);
    }
}
