//! A progress line on stderr for long copies: done / total, percent, rate and time left,
//! redrawn a few times a second by a small thread, and only when someone can see it.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::units::{human_bytes, mib_per_sec};

/// How often the line is redrawn.
const REDRAW: Duration = Duration::from_millis(250);

/// A running progress display. Count bytes with [`Progress::add`]; [`Progress::finish`]
/// clears the line.
pub struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    drawer: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows progress if `forced` or stderr is a terminal. `total` is None for a stream of
    /// unknown length.
    pub fn start(total: Option<u64>, forced: bool) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let drawer = (forced || std::io::stderr().is_terminal()).then(|| {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || draw_until_stopped(total, &done, &stop))
        });
        Progress { done, stop, drawer }
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Stops the display and erases its line.
    pub fn finish(mut self) {
        self.stop_drawer();
    }

    fn stop_drawer(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.drawer.take() {
            let _ = handle.join();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop_drawer();
    }
}

fn draw_until_stopped(total: Option<u64>, done: &AtomicU64, stop: &AtomicBool) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(REDRAW);
        let line = render(total, done.load(Ordering::Relaxed), started.elapsed());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    }
}

/// `[#########...........]  45%  115.2 MiB / 256.0 MiB  310.5 MiB/s  ETA 1s`
fn render(total: Option<u64>, done: u64, elapsed: Duration) -> String {
    const WIDTH: usize = 30;
    let seconds = elapsed.as_secs_f64();
    let rate = mib_per_sec(done, seconds);
    match total {
        Some(total) if total > 0 => {
            let fraction = (done as f64 / total as f64).clamp(0.0, 1.0);
            let filled = (fraction * WIDTH as f64) as usize;
            let eta = if done > 0 {
                let left = seconds * (total.saturating_sub(done)) as f64 / done as f64;
                format!("ETA {left:.0}s")
            } else {
                "ETA ?".into()
            };
            format!(
                "[{}{}] {:3.0}%  {} / {}  {rate:.1} MiB/s  {eta}",
                "#".repeat(filled),
                ".".repeat(WIDTH - filled),
                fraction * 100.0,
                human_bytes(done),
                human_bytes(total)
            )
        }
        _ => format!("{}  {rate:.1} MiB/s", human_bytes(done)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let half = render(Some(200 << 20), 100 << 20, Duration::from_secs(1));
        assert!(
            half.starts_with("[###############..............."),
            "{half}"
        );
        assert!(half.contains(" 50%") && half.contains("100.0 MiB/s") && half.contains("ETA 1s"));
        let stream = render(None, 1 << 20, Duration::from_secs(2));
        assert_eq!(stream, "1.00 MiB  0.5 MiB/s");
        assert!(render(Some(10), 0, Duration::ZERO).contains("ETA ?"));
    }
}
