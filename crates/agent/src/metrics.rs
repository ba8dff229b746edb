//! Per-VM counters and latency histograms, and their Prometheus text exposition.
//!
//! [`VmMetrics`] is updated on every command from the VM's I/O path, so it is lock-free
//! (relaxed atomics: counters may be a command apart from one another in a snapshot, never
//! torn). [`render`] writes the host's VMs and adapters in the text format 0.0.4.
//!
//! Not here: the HTTP endpoint, the data paths' own statistics (passed in as numbers), and any
//! aggregation over time (Prometheus does that).

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a command did, for the per-operation counters.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Read,
    Write,
    /// Anything else (INQUIRY, TEST UNIT READY, SYNCHRONIZE CACHE, …); its bytes are not
    /// counted as read or written data.
    Other,
}

impl Op {
    const ALL: [Op; 3] = [Op::Read, Op::Write, Op::Other];

    /// The `op` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Other => "other",
        }
    }
}

/// Upper bounds of the latency buckets in nanoseconds: 25 µs to 10 s in 1-2.5-5 steps, which
/// covers a RAM-backed LUN on loopback up to a command that waited out a session recovery.
const BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A lock-free latency histogram with fixed buckets (plus one for everything above 10 s).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram::default()
    }

    pub fn observe(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
    }

    /// Cumulative counts as Prometheus wants them: `(upper bound, observations ≤ it)`, the
    /// last bound `None` for +Inf. The last count is the total, read in the same pass, so the
    /// list is always consistent with itself.
    pub fn buckets(&self) -> Vec<(Option<Duration>, u64)> {
        let mut cumulative = 0u64;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, count)| {
                cumulative = cumulative.saturating_add(count.load(Relaxed));
                (
                    BOUNDS_NS.get(i).map(|&ns| Duration::from_nanos(ns)),
                    cumulative,
                )
            })
            .collect()
    }

    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.load(Relaxed))
            .fold(0, u64::saturating_add)
    }

    /// Total of all observations (saturates after 584 years).
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Relaxed))
    }

    /// The largest observation.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns.load(Relaxed))
    }

    /// Estimates the `q`-quantile (`q` in 0..=1, clamped) by interpolating linearly inside
    /// its bucket, never above the largest observation. `None` when nothing was observed.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let buckets = self.buckets();
        let total = buckets.last().map_or(0, |b| b.1);
        if total == 0 {
            return None;
        }
        let max_ns = self.max_ns.load(Relaxed);
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = q * total as f64;
        let mut below = 0u64;
        let mut lower_ns = 0u64;
        for (bound, cumulative) in buckets {
            let upper_ns = bound.map_or(max_ns.max(lower_ns), |b| b.as_nanos() as u64);
            let in_bucket = cumulative - below;
            if in_bucket > 0 && cumulative as f64 >= rank {
                let fraction = ((rank - below as f64) / in_bucket as f64).clamp(0.0, 1.0);
                let estimate = lower_ns as f64 + (upper_ns - lower_ns) as f64 * fraction;
                return Some(Duration::from_nanos((estimate as u64).min(max_ns)));
            }
            below = cumulative;
            lower_ns = upper_ns;
        }
        Some(Duration::from_nanos(max_ns))
    }
}

/// One VM's counters, updated by its I/O path.
#[derive(Debug, Default)]
pub struct VmMetrics {
    commands: [AtomicU64; 3],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    failovers: AtomicU64,
    latency: Histogram,
}

impl VmMetrics {
    /// Counts one finished command. `bytes` counts as read or written data only for reads and
    /// writes; failed commands count as errors and in the latency histogram.
    pub fn record(&self, op: Op, bytes: u64, latency: Duration, ok: bool) {
        self.commands[op as usize].fetch_add(1, Relaxed);
        match op {
            Op::Read => self.bytes_read.fetch_add(bytes, Relaxed),
            Op::Write => self.bytes_written.fetch_add(bytes, Relaxed),
            Op::Other => 0,
        };
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        }
        self.latency.observe(latency);
    }

    /// The VM moved to another data path.
    pub fn failover(&self) {
        self.failovers.fetch_add(1, Relaxed);
    }

    pub fn commands(&self, op: Op) -> u64 {
        self.commands[op as usize].load(Relaxed)
    }

    pub fn latency(&self) -> &Histogram {
        &self.latency
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let us = |d: Option<Duration>| d.map_or(0, |d| d.as_micros() as u64);
        MetricsSnapshot {
            reads: self.commands(Op::Read),
            writes: self.commands(Op::Write),
            others: self.commands(Op::Other),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            failovers: self.failovers.load(Relaxed),
            latency_count: self.latency.count(),
            latency_p50_us: us(self.latency.quantile(0.5)),
            latency_p99_us: us(self.latency.quantile(0.99)),
            latency_max_us: us(Some(self.latency.max())),
        }
    }
}

/// A VM's counters at one moment, for the API. Latencies are estimates from the histogram's
/// buckets (0 when no command completed yet).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub others: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub failovers: u64,
    pub latency_count: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
}

/// One VM as [`render`] shows it.
#[derive(Clone, Copy, Debug)]
pub struct VmSample<'a> {
    pub vm: &'a str,
    /// `offload`, `software` or `none`.
    pub path_kind: &'a str,
    /// Empty when there is no path.
    pub adapter: &'a str,
    pub metrics: &'a VmMetrics,
    /// Session recoveries of the current data path.
    pub path_recoveries: u64,
}

/// One adapter as [`render`] shows it.
#[derive(Clone, Copy, Debug)]
pub struct AdapterSample<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub healthy: bool,
    /// Virtual functions the adapter has, if it has any notion of them.
    pub vfs_total: Option<u32>,
    pub vfs_in_use: u32,
    pub vms: u32,
}

/// The host's metrics in the Prometheus text format 0.0.4: each family's HELP and TYPE once,
/// then its samples, every family present even without samples.
pub fn render(host: &str, vms: &[VmSample], adapters: &[AdapterSample]) -> String {
    let mut out = Exposition::default();

    out.family(
        "viscsi_vm_commands_total",
        "counter",
        "SCSI commands completed, by operation.",
    );
    for s in vms {
        for op in Op::ALL {
            let labels = [("host", host), ("vm", s.vm), ("op", op.as_str())];
            out.sample("viscsi_vm_commands_total", &labels, s.metrics.commands(op));
        }
    }

    out.family(
        "viscsi_vm_bytes_total",
        "counter",
        "Data bytes read and written by the VM.",
    );
    for s in vms {
        for (direction, counter) in [
            ("read", &s.metrics.bytes_read),
            ("write", &s.metrics.bytes_written),
        ] {
            let labels = [("host", host), ("vm", s.vm), ("direction", direction)];
            out.sample("viscsi_vm_bytes_total", &labels, counter.load(Relaxed));
        }
    }

    for (name, help, value) in [
        (
            "viscsi_vm_errors_total",
            "Commands that failed (path failure, session loss, target failure, refusal).",
            (|m: &VmSample| m.metrics.errors.load(Relaxed)) as fn(&VmSample) -> u64,
        ),
        (
            "viscsi_vm_failovers_total",
            "Moves of the VM to another data path.",
            |m: &VmSample| m.metrics.failovers.load(Relaxed),
        ),
        (
            "viscsi_vm_session_recoveries_total",
            "Session recoveries on the VM's current data path.",
            |m: &VmSample| m.path_recoveries,
        ),
    ] {
        out.family(name, "counter", help);
        for s in vms {
            out.sample(name, &[("host", host), ("vm", s.vm)], value(s));
        }
    }

    out.family(
        "viscsi_vm_latency_seconds",
        "histogram",
        "Command latency as the VM sees it, re-issues included.",
    );
    for s in vms {
        let histogram = s.metrics.latency();
        let buckets = histogram.buckets();
        for &(bound, cumulative) in &buckets {
            let le = bound.map_or_else(|| "+Inf".to_string(), |b| b.as_secs_f64().to_string());
            let labels = [("host", host), ("vm", s.vm), ("le", le.as_str())];
            out.sample("viscsi_vm_latency_seconds_bucket", &labels, cumulative);
        }
        let labels = [("host", host), ("vm", s.vm)];
        out.sample(
            "viscsi_vm_latency_seconds_sum",
            &labels,
            histogram.sum().as_secs_f64(),
        );
        let count = buckets.last().map_or(0, |b| b.1);
        out.sample("viscsi_vm_latency_seconds_count", &labels, count);
    }

    out.family(
        "viscsi_vm_data_path",
        "gauge",
        "The VM's current data path (always 1).",
    );
    for s in vms {
        let labels = [
            ("host", host),
            ("vm", s.vm),
            ("kind", s.path_kind),
            ("adapter", s.adapter),
        ];
        out.sample("viscsi_vm_data_path", &labels, 1);
    }

    out.family(
        "viscsi_adapter_up",
        "gauge",
        "1 if the adapter is healthy, else 0.",
    );
    for a in adapters {
        let labels = [("host", host), ("adapter", a.name), ("kind", a.kind)];
        out.sample("viscsi_adapter_up", &labels, u8::from(a.healthy));
    }

    out.family(
        "viscsi_adapter_vfs",
        "gauge",
        "Virtual functions of the adapter, total and in use.",
    );
    for a in adapters {
        if let Some(total) = a.vfs_total {
            let labels = [("host", host), ("adapter", a.name), ("state", "total")];
            out.sample("viscsi_adapter_vfs", &labels, total);
        }
        let labels = [("host", host), ("adapter", a.name), ("state", "in_use")];
        out.sample("viscsi_adapter_vfs", &labels, a.vfs_in_use);
    }

    out.family(
        "viscsi_adapter_vms",
        "gauge",
        "VMs whose data path is on the adapter.",
    );
    for a in adapters {
        out.sample(
            "viscsi_adapter_vms",
            &[("host", host), ("adapter", a.name)],
            a.vms,
        );
    }

    out.text
}

#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.text
            .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        self.text.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.text.push(',');
            }
            self.text.push_str(label);
            self.text.push_str("=\"");
            escape_label_value(&mut self.text, value);
            self.text.push('"');
        }
        self.text.push_str(&format!("}} {value}\n"));
    }
}

/// Label values escape backslash, double quote and line feed; nothing else.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    /// A series' labels other than `le`.
    type SeriesKey = Vec<(String, String)>;

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// Parses `{a="x",b="y"} value`, undoing the escapes; panics (the test fails) on anything
    /// the text format does not allow.
    fn parse_labels_and_value(line: &str, rest: &str) -> (BTreeMap<String, String>, f64) {
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                let start = chars.peek().map(|&(i, _)| i).expect(line);
                if body[start..].starts_with('}') {
                    rest = &body[start + 1..];
                    break;
                }
                let eq = body[start..].find('=').expect(line) + start;
                let label = &body[start..eq];
                assert!(is_name(label), "bad label name in {line}");
                while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                    chars.next();
                }
                assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next().expect(line).1 {
                        '"' => break,
                        '\\' => match chars.next().expect(line).1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        '\n' => panic!("raw newline in {line}"),
                        c => value.push(c),
                    }
                }
                assert!(labels.insert(label.to_string(), value).is_none(), "{line}");
                if chars.peek().is_some_and(|&(_, c)| c == ',') {
                    chars.next();
                }
            }
        }
        let value = rest.strip_prefix(' ').expect(line);
        assert!(!value.contains(' '), "timestamp or junk in {line}");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        (labels, value)
    }

    /// Checks `text` against the text format 0.0.4 and the conventions Prometheus relies on;
    /// returns the samples and each family's type.
    fn check(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
        assert!(text.ends_with('\n'));
        let mut help = HashMap::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut current: Option<String> = None;
        let mut finished = Vec::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').expect(line);
                assert!(is_name(name) && !text.is_empty(), "{line}");
                assert!(
                    help.insert(name.to_string(), ()).is_none(),
                    "HELP twice: {line}"
                );
                if let Some(previous) = current.replace(name.to_string()) {
                    finished.push(previous);
                }
                assert!(
                    !finished.contains(&name.to_string()),
                    "family split: {line}"
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert_eq!(Some(name), current.as_deref(), "TYPE without HELP: {line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice: {line}"
                );
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
                let end = line.find(['{', ' ']).expect(line);
                let name = &line[..end];
                assert!(is_name(name), "{line}");
                let family = current.as_deref().expect("sample before any family");
                let kind = types.get(family).expect("sample before TYPE");
                let ok = if kind == "histogram" {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(family))
                } else {
                    name == family
                };
                assert!(ok, "sample {name} under family {family}");
                let (labels, value) = parse_labels_and_value(line, &line[end..]);
                if name.ends_with("_total") || kind == "histogram" {
                    assert!(value >= 0.0, "{line}");
                }
                samples.push(Sample {
                    name: name.to_string(),
                    labels,
                    value,
                });
            }
        }
        // Histograms: per series, buckets ascending in le, counts cumulative, +Inf last and
        // equal to _count.
        for (family, kind) in &types {
            if kind != "histogram" {
                continue;
            }
            let mut series: BTreeMap<SeriesKey, Vec<(f64, f64)>> = BTreeMap::new();
            let mut counts = BTreeMap::new();
            for s in &samples {
                let mut key: BTreeMap<_, _> = s.labels.clone();
                if s.name == format!("{family}_bucket") {
                    let le = key.remove("le").expect("bucket without le");
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    };
                    series
                        .entry(key.into_iter().collect())
                        .or_default()
                        .push((le, s.value));
                } else if s.name == format!("{family}_count") {
                    counts.insert(key.into_iter().collect::<Vec<_>>(), s.value);
                }
            }
            assert_eq!(series.len(), counts.len());
            for (key, buckets) in series {
                assert!(buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
                let last = buckets.last().unwrap();
                assert_eq!(last.0, f64::INFINITY);
                assert_eq!(Some(&last.1), counts.get(&key), "{key:?}");
            }
        }
        (samples, types)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(matching.len(), 1, "{name} {labels:?}: {matching:?}");
        matching[0].value
    }

    #[test]
    fn render_parses_and_counts() {
        let a = VmMetrics::default();
        a.record(Op::Read, 4096, Duration::from_micros(80), true);
        a.record(Op::Read, 8192, Duration::from_micros(120), true);
        a.record(Op::Write, 512, Duration::from_millis(3), true);
        a.record(Op::Write, 0, Duration::from_secs(30), false);
        a.record(Op::Other, 36, Duration::from_micros(10), true);
        a.failover();
        let b = VmMetrics::default();
        let vms = [
            VmSample {
                vm: "db-1",
                path_kind: "offload",
                adapter: "hba0",
                metrics: &a,
                path_recoveries: 2,
            },
            VmSample {
                vm: "idle",
                path_kind: "none",
                adapter: "",
                metrics: &b,
                path_recoveries: 0,
            },
        ];
        let adapters = [
            AdapterSample {
                name: "hba0",
                kind: "offload",
                healthy: true,
                vfs_total: Some(8),
                vfs_in_use: 1,
                vms: 1,
            },
            AdapterSample {
                name: "software",
                kind: "software",
                healthy: false,
                vfs_total: None,
                vfs_in_use: 0,
                vms: 0,
            },
        ];
        let text = render("h1", &vms, &adapters);
        let (samples, types) = check(&text);
        assert_eq!(types.len(), 10);
        for family in [
            "viscsi_vm_commands_total",
            "viscsi_vm_bytes_total",
            "viscsi_vm_errors_total",
            "viscsi_vm_failovers_total",
            "viscsi_vm_session_recoveries_total",
            "viscsi_vm_latency_seconds",
            "viscsi_vm_data_path",
            "viscsi_adapter_up",
            "viscsi_adapter_vfs",
            "viscsi_adapter_vms",
        ] {
            assert!(types.contains_key(family), "{family}");
        }
        assert!(samples
            .iter()
            .all(|s| s.labels.get("host").map(String::as_str) == Some("h1")));

        let db = |name: &str, extra: &[(&str, &str)]| {
            let mut labels = vec![("vm", "db-1")];
            labels.extend_from_slice(extra);
            value(&samples, name, &labels)
        };
        assert_eq!(db("viscsi_vm_commands_total", &[("op", "read")]), 2.0);
        assert_eq!(db("viscsi_vm_commands_total", &[("op", "write")]), 2.0);
        assert_eq!(db("viscsi_vm_commands_total", &[("op", "other")]), 1.0);
        assert_eq!(
            db("viscsi_vm_bytes_total", &[("direction", "read")]),
            12288.0
        );
        assert_eq!(
            db("viscsi_vm_bytes_total", &[("direction", "write")]),
            512.0
        );
        assert_eq!(db("viscsi_vm_errors_total", &[]), 1.0);
        assert_eq!(db("viscsi_vm_failovers_total", &[]), 1.0);
        assert_eq!(db("viscsi_vm_session_recoveries_total", &[]), 2.0);
        assert_eq!(db("viscsi_vm_latency_seconds_count", &[]), 5.0);
        assert_eq!(
            db("viscsi_vm_latency_seconds_bucket", &[("le", "0.000025")]),
            1.0
        );
        assert_eq!(
            db("viscsi_vm_latency_seconds_bucket", &[("le", "0.0001")]),
            2.0
        );
        assert_eq!(db("viscsi_vm_latency_seconds_bucket", &[("le", "10")]), 4.0);
        assert_eq!(
            db("viscsi_vm_latency_seconds_bucket", &[("le", "+Inf")]),
            5.0
        );
        let sum = db("viscsi_vm_latency_seconds_sum", &[]);
        assert!((sum - 30.00321).abs() < 1e-9, "{sum}");
        assert_eq!(
            db(
                "viscsi_vm_data_path",
                &[("kind", "offload"), ("adapter", "hba0")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &samples,
                "viscsi_vm_latency_seconds_count",
                &[("vm", "idle")]
            ),
            0.0
        );
        let idle = value(
            &samples,
            "viscsi_vm_data_path",
            &[("vm", "idle"), ("kind", "none")],
        );
        assert_eq!(idle, 1.0);

        let hba = |name: &str, extra: &[(&str, &str)]| {
            let mut labels = vec![("adapter", "hba0")];
            labels.extend_from_slice(extra);
            value(&samples, name, &labels)
        };
        assert_eq!(hba("viscsi_adapter_up", &[("kind", "offload")]), 1.0);
        assert_eq!(hba("viscsi_adapter_vfs", &[("state", "total")]), 8.0);
        assert_eq!(hba("viscsi_adapter_vfs", &[("state", "in_use")]), 1.0);
        assert_eq!(hba("viscsi_adapter_vms", &[]), 1.0);
        let sw = [("adapter", "software")];
        assert_eq!(value(&samples, "viscsi_adapter_up", &sw), 0.0);
        assert_eq!(value(&samples, "viscsi_adapter_vfs", &sw), 0.0);
        assert!(!text.contains("adapter=\"software\",state=\"total\""));
    }

    #[test]
    fn empty_host_still_declares_families() {
        let text = render("h", &[], &[]);
        let (samples, types) = check(&text);
        assert!(samples.is_empty());
        assert_eq!(types.len(), 10);
    }

    #[test]
    fn label_values_escaped() {
        let m = VmMetrics::default();
        let vm = "a\"b\\c\nd é{}=,";
        let host = "h\\\"\n";
        let vms = [VmSample {
            vm,
            path_kind: "software",
            adapter: "x\"",
            metrics: &m,
            path_recoveries: 0,
        }];
        let adapters = [AdapterSample {
            name: "\n",
            kind: "offload",
            healthy: true,
            vfs_total: None,
            vfs_in_use: 0,
            vms: 0,
        }];
        let text = render(host, &vms, &adapters);
        assert!(text.contains(r#"vm="a\"b\\c\nd é{}=,""#), "{text}");
        let (samples, _) = check(&text);
        assert!(samples.iter().all(|s| s.labels["host"] == host));
        assert_eq!(
            value(
                &samples,
                "viscsi_vm_data_path",
                &[("vm", vm), ("adapter", "x\"")]
            ),
            1.0
        );
        assert_eq!(
            value(&samples, "viscsi_adapter_up", &[("adapter", "\n")]),
            1.0
        );
    }

    #[test]
    fn quantiles_are_sane() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.count(), 0);
        // 1 ms … 1000 ms uniformly.
        for ms in 1..=1000 {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), Duration::from_millis(1000));
        assert_eq!(h.sum(), Duration::from_millis(500_500));
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        let p0 = h.quantile(0.0).unwrap();
        let p100 = h.quantile(1.0).unwrap();
        assert!(
            p50 > Duration::from_millis(250) && p50 <= Duration::from_millis(500),
            "{p50:?}"
        );
        assert!(
            p99 > Duration::from_millis(500) && p99 <= Duration::from_millis(1000),
            "{p99:?}"
        );
        assert!(p0 <= Duration::from_millis(1), "{p0:?}");
        assert_eq!(p100, Duration::from_millis(1000));
        let mut last = Duration::ZERO;
        for i in 0..=100 {
            let q = h.quantile(f64::from(i) / 100.0).unwrap();
            assert!(q >= last, "not monotonic at {i}");
            last = q;
        }
        assert_eq!(h.quantile(f64::NAN), Some(p0));
        assert_eq!(h.quantile(7.0), Some(p100));

        // One value: every quantile within its bucket and never above it.
        let one = Histogram::new();
        one.observe(Duration::from_micros(700));
        for q in [0.0, 0.5, 0.99, 1.0] {
            let v = one.quantile(q).unwrap();
            assert!(
                v >= Duration::from_micros(500) && v <= Duration::from_micros(700),
                "{v:?}"
            );
        }

        // Beyond the last bound: the estimate stays between 10 s and the maximum.
        let slow = Histogram::new();
        slow.observe(Duration::from_secs(40));
        slow.observe(Duration::from_secs(20));
        let p50 = slow.quantile(0.5).unwrap();
        assert!(
            p50 >= Duration::from_secs(10) && p50 <= Duration::from_secs(40),
            "{p50:?}"
        );
        assert_eq!(slow.quantile(1.0), Some(Duration::from_secs(40)));
        slow.observe(Duration::MAX);
        assert_eq!(slow.max(), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn buckets_edges_and_snapshot() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(25)); // on the bound: belongs to le=25µs
        h.observe(Duration::from_nanos(25_001));
        h.observe(Duration::ZERO);
        let buckets = h.buckets();
        assert_eq!(buckets.len(), 19);
        assert_eq!(buckets[0], (Some(Duration::from_micros(25)), 2));
        assert_eq!(buckets[1], (Some(Duration::from_micros(50)), 3));
        assert_eq!(buckets[18], (None, 3));

        let m = VmMetrics::default();
        assert_eq!(m.snapshot(), MetricsSnapshot::default());
        for _ in 0..99 {
            m.record(Op::Read, 4096, Duration::from_micros(200), true);
        }
        m.record(Op::Write, 4096, Duration::from_millis(40), false);
        m.failover();
        m.failover();
        let s = m.snapshot();
        assert_eq!((s.reads, s.writes, s.others), (99, 1, 0));
        assert_eq!(
            (s.bytes_read, s.bytes_written, s.errors, s.failovers),
            (405_504, 4096, 1, 2)
        );
        assert_eq!(s.latency_count, 100);
        assert!(s.latency_p50_us > 100 && s.latency_p50_us <= 250, "{s:?}");
        assert!(s.latency_p99_us <= 250, "{s:?}");
        assert_eq!(s.latency_max_us, 40_000);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<MetricsSnapshot>(&json).unwrap(), s);
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let m = std::sync::Arc::new(VmMetrics::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        m.record(Op::Write, 1, Duration::from_micros(i % 3000), true);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = m.snapshot();
        assert_eq!(
            (s.writes, s.bytes_written, s.latency_count),
            (40_000, 40_000, 40_000)
        );
    }
}
