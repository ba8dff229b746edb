//! Capturing a target's loopback traffic with `tshark` and checking every iSCSI PDU.
//!
//! [`Capture::start`] runs `tshark -i lo -f "tcp port PORT" -B 64 -w FILE` (a 64 MiB buffer:
//! the default one drops packets during bursts) and waits until it is capturing.
//! [`analyze`] decodes the file with Wireshark's iSCSI dissector forced onto the port
//! (`-d tcp.port==PORT,iscsi`), full TCP and iSCSI reassembly, and the "bogus PDU" filter off
//! (`-o iscsi.bogus_pdu_filter:FALSE`, otherwise PDUs the dissector dislikes are silently
//! ignored), then counts malformed frames per protocol, header and data digests (good / bad) and
//! the opcodes seen.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{run_with_timeout, Daemon};
use crate::tools::require_tool;

/// A running capture; stopped (and its file kept) by [`Capture::stop`], killed on drop.
#[derive(Debug)]
pub struct Capture {
    daemon: Daemon,
    pcap: PathBuf,
    port: u16,
}

impl Capture {
    /// Starts capturing TCP port `port` on `lo` into `pcap`. Needs root (or capture rights).
    pub fn start(port: u16, pcap: &Path) -> Capture {
        let tshark = require_tool("tshark");
        let log = pcap.with_extension("tshark.log");
        let mut cmd = Command::new(tshark);
        cmd.args([
            "-i",
            "lo",
            "-f",
            &format!("tcp port {port}"),
            "-B",
            "64",
            "-q",
        ])
        .arg("-w")
        .arg(pcap);
        let mut daemon = Daemon::spawn("tshark", &mut cmd, &log);
        let start = Instant::now();
        loop {
            let text = daemon.log();
            if text.contains("Capturing on") {
                break;
            }
            if let Some(status) = daemon.exit_status() {
                panic!("tshark exited with {status} before capturing (needs root):\n{text}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "tshark did not start capturing within 30 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // dumpcap reports "Capturing on" just before the filter is live.
        std::thread::sleep(Duration::from_millis(500));
        Capture {
            daemon,
            pcap: pcap.to_path_buf(),
            port,
        }
    }

    /// Stops the capture (SIGINT, so the file is complete) and returns the pcapng path.
    pub fn stop(mut self) -> PathBuf {
        std::thread::sleep(Duration::from_millis(500));
        let status = self
            .daemon
            .signal_and_wait(libc::SIGINT, Duration::from_secs(20));
        assert!(
            status.is_some(),
            "tshark did not stop on SIGINT:\n{}",
            self.daemon.log()
        );
        self.pcap.clone()
    }

    /// The captured port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// What [`analyze`] found in a capture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureAnalysis {
    /// Frames in the file.
    pub frames: usize,
    /// iSCSI PDUs decoded.
    pub iscsi_pdus: usize,
    /// PDUs per opcode (`0x01`, `0x21`, …).
    pub opcodes: BTreeMap<String, usize>,
    /// Malformed frames per protocol named in `[Malformed Packet: PROTO]`.
    pub malformed: BTreeMap<String, usize>,
    /// Header digests checked good / bad.
    pub header_digests_good: usize,
    /// Header digests with a wrong CRC32C.
    pub header_digests_bad: usize,
    /// Data digests checked good.
    pub data_digests_good: usize,
    /// Data digests with a wrong CRC32C.
    pub data_digests_bad: usize,
    /// Expert infos at warning level or above (summary lines).
    pub expert_warnings: Vec<String>,
}

impl CaptureAnalysis {
    /// Malformed frames blamed on the iSCSI dissector.
    pub fn malformed_iscsi(&self) -> usize {
        self.malformed.get("iSCSI").copied().unwrap_or(0)
    }

    /// PDUs with the given opcode (`0x03` = Login Request, …).
    pub fn opcode(&self, opcode: &str) -> usize {
        self.opcodes.get(opcode).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for CaptureAnalysis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "frames {}, iSCSI PDUs {}, header digests {} good / {} bad, data digests {} good / {} bad",
            self.frames,
            self.iscsi_pdus,
            self.header_digests_good,
            self.header_digests_bad,
            self.data_digests_good,
            self.data_digests_bad
        )?;
        writeln!(f, "malformed frames by protocol: {:?}", self.malformed)?;
        writeln!(f, "opcode histogram:")?;
        for (opcode, n) in &self.opcodes {
            writeln!(f, "  {opcode:>6} {n:>8}  {}", opcode_name(opcode))?;
        }
        for warning in &self.expert_warnings {
            writeln!(f, "expert: {warning}")?;
        }
        Ok(())
    }
}

/// RFC 7143 name of an opcode as tshark prints it (`0x01`).
pub fn opcode_name(opcode: &str) -> &'static str {
    match u8::from_str_radix(opcode.trim_start_matches("0x"), 16).unwrap_or(0xff) {
        0x00 => "NOP-Out",
        0x01 => "SCSI Command",
        0x02 => "Task Management Request",
        0x03 => "Login Request",
        0x04 => "Text Request",
        0x05 => "SCSI Data-Out",
        0x06 => "Logout Request",
        0x10 => "SNACK Request",
        0x20 => "NOP-In",
        0x21 => "SCSI Response",
        0x22 => "Task Management Response",
        0x23 => "Login Response",
        0x24 => "Text Response",
        0x25 => "SCSI Data-In",
        0x26 => "Logout Response",
        0x31 => "Ready To Transfer",
        0x32 => "Asynchronous Message",
        0x3f => "Reject",
        _ => "?",
    }
}

/// Decodes `pcap` with iSCSI on `port` and counts what matters.
pub fn analyze(pcap: &Path, port: u16) -> CaptureAnalysis {
    let tshark = require_tool("tshark");
    let options: Vec<String> = vec![
        "-o".into(),
        "tcp.desegment_tcp_streams:TRUE".into(),
        "-o".into(),
        "iscsi.desegment_iscsi_messages:TRUE".into(),
        "-o".into(),
        "iscsi.bogus_pdu_filter:FALSE".into(),
        "-o".into(),
        format!("iscsi.target_ports:{port}"),
        "-d".into(),
        format!("tcp.port=={port},iscsi"),
    ];
    let run = |extra: &[&str]| -> String {
        let out = run_with_timeout(
            Command::new(&tshark)
                .arg("-r")
                .arg(pcap)
                .args(&options)
                .args(extra),
            Duration::from_secs(300),
        );
        assert!(out.success(), "tshark decode failed: {out}");
        out.stdout
    };
    let mut analysis = CaptureAnalysis {
        frames: run(&["-T", "fields", "-e", "frame.number"]).lines().count(),
        ..CaptureAnalysis::default()
    };
    for line in run(&["-Y", "iscsi", "-T", "fields", "-e", "iscsi.opcode"]).lines() {
        // One frame can carry several PDUs: "0x25,0x25,0x21".
        for opcode in line.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            analysis.iscsi_pdus += 1;
            *analysis.opcodes.entry(opcode.to_string()).or_default() += 1;
        }
    }
    for line in run(&["-Y", "_ws.malformed", "-V"]).lines() {
        if let Some(start) = line.find("[Malformed Packet: ") {
            let rest = &line[start + "[Malformed Packet: ".len()..];
            let proto = rest.split(']').next().unwrap_or("?").to_string();
            *analysis.malformed.entry(proto).or_default() += 1;
        }
    }
    for line in run(&["-Y", "iscsi.headerdigest32 || iscsi.datadigest32", "-V"]).lines() {
        let line = line.trim();
        let good = line.contains("Good");
        let bad = line.contains("Bad");
        if line.starts_with("HeaderDigest") {
            analysis.header_digests_good += usize::from(good);
            analysis.header_digests_bad += usize::from(bad);
        } else if line.starts_with("DataDigest") {
            analysis.data_digests_good += usize::from(good);
            analysis.data_digests_bad += usize::from(bad);
        }
    }
    analysis.expert_warnings = run(&["-q", "-z", "expert,warn"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('=') && !l.starts_with("Severity"))
        .map(str::to_string)
        .collect();
    analysis
}
