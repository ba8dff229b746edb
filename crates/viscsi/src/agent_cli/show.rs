//! Rendering of agent views for people: times, paths, tables.

use agent::model::VmView;
use datapath::PathInfo;

/// `2026-11-28 10:59:13.123Z` for milliseconds since the Unix epoch (UTC).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// `offload hba0/vf2` or `software`.
pub fn path_name(p: &PathInfo) -> String {
    match p.vf {
        Some(vf) => format!("{} {}/vf{vf}", p.kind, p.adapter),
        None => p.kind.to_string(),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `viscsi vm show`.
pub fn vm_details(v: &VmView) -> String {
    let mut s = String::new();
    let mut line = |k: &str, val: String| s.push_str(&format!("{k:<16}{val}\n"));
    line("name", v.name.clone());
    line("state", format!("{:?}", v.state).to_lowercase());
    line(
        "data path",
        v.path
            .as_ref()
            .map(path_name)
            .unwrap_or_else(|| "none".into()),
    );
    line("why", v.path_reason.clone());
    line(
        "policy",
        match &v.adapter {
            Some(a) => format!("{} (adapter {a})", v.policy),
            None => v.policy.to_string(),
        },
    );
    if let Some(p) = &v.path {
        line("portal", p.portal.clone());
        line(
            "digests",
            format!(
                "header {}, data {}",
                if p.header_digest { "crc32c" } else { "none" },
                if p.data_digest { "crc32c" } else { "none" }
            ),
        );
    }
    if let Some(h) = &v.health {
        line("health", format!("{h:?}").to_lowercase());
    }
    line("initiator", v.client.initiator_name.clone());
    line("isid", v.client.isid.clone());
    line("target", v.client.target.clone());
    if !v.client.luns.is_empty() {
        let luns: Vec<String> = v.client.luns.iter().map(u64::to_string).collect();
        line("luns", luns.join(", "));
    }
    if let Some(c) = &v.client.chap {
        line(
            "chap",
            match &c.target_user {
                Some(t) => format!("user {} (mutual, target {t})", c.user),
                None => format!("user {}", c.user),
            },
        );
    }
    if let Some(f) = &v.frontend {
        let kind = match f.kind {
            agent::model::FrontendKind::Scsi => "vhost-user-scsi",
            agent::model::FrontendKind::Blk => "vhost-user-blk",
        };
        let state = match (&f.serving, &f.error) {
            (true, _) => "serving".to_string(),
            (false, Some(e)) => format!("not serving: {e}"),
            (false, None) => "not serving".to_string(),
        };
        line(
            "frontend",
            format!(
                "{kind} on {} ({} queues), {state}",
                f.socket.display(),
                f.queues
            ),
        );
        line("qemu", f.qemu_options.join(" "));
    }
    let m = &v.metrics;
    line(
        "commands",
        format!(
            "{} read, {} write, {} other; {} errors",
            m.reads, m.writes, m.others, m.errors
        ),
    );
    line(
        "bytes",
        format!("{} read, {} written", m.bytes_read, m.bytes_written),
    );
    line(
        "latency",
        format!(
            "p50 {} µs, p99 {} µs, max {} µs",
            m.latency_p50_us, m.latency_p99_us, m.latency_max_us
        ),
    );
    line(
        "recoveries",
        format!(
            "{} failovers ({} commands re-issued), {} session recoveries",
            m.failovers, v.reissued, v.path_stats.recoveries
        ),
    );
    s.push_str("history\n");
    for e in &v.history {
        s.push_str(&format!(
            "  {}  {:<9} {}\n",
            utc(e.at_ms),
            e.kind,
            e.message
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000Z");
        assert_eq!(utc(1_795_863_553_123), "2026-11-28 10:59:13.123Z");
    }
}
