//! The idle fleet (`--idle-devices`): connections that authenticate, heartbeat and read,
//! as most of a real chat system's sockets do, opened before the senders start. They are
//! not Goose users (each of those costs about 260 KiB of generator memory): one small task
//! each, with 4 KiB WebSocket buffers. The generator measures what one costs it.

use crate::ledger::Shared;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

/// Connects in flight at once while the fleet opens.
const CONCURRENT_CONNECTS: usize = 256;
/// Heartbeat period (PROTOCOL.md §3: `heartbeat_interval_ms`, 30 s; the server closes a
/// connection silent for 60 s).
const HEARTBEAT: Duration = Duration::from_secs(30);

/// The open fleet.
pub struct Fleet {
    stop: watch::Sender<bool>,
    closing: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Devices that connected and authenticated.
    pub connected: usize,
    /// Generator resident memory before the fleet and with all of it connected, KiB.
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
}

impl Fleet {
    /// Generator memory per connected idle device, KiB.
    pub fn kib_per_device(&self) -> Option<f64> {
        match (self.rss_before_kib, self.rss_after_kib) {
            (Some(b), Some(a)) if self.connected > 0 => {
                Some(a.saturating_sub(b) as f64 / self.connected as f64)
            }
            _ => None,
        }
    }

    /// Closes every fleet socket (on purpose: not counted as errors) and waits, bounded.
    pub async fn close(self) {
        self.closing.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for t in self.tasks {
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                break;
            }
        }
    }
}

/// This process's resident memory, KiB (Linux `/proc/self/statm`).
pub fn rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

/// Opens `cfg.idle_devices` idle devices and returns once each has connected or failed
/// (bounded: a minute plus 10 ms per device), printing progress to stderr.
pub async fn open(shared: Arc<Shared>) -> Fleet {
    let n = shared.cfg.idle_devices;
    let rss_before_kib = rss_kib();
    let (stop, stop_rx) = watch::channel(false);
    let closing = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let permits = Arc::new(Semaphore::new(CONCURRENT_CONNECTS));
    let mut tasks = Vec::with_capacity(n);
    for j in 0..n {
        let (shared, mut stop_rx, closing) = (shared.clone(), stop_rx.clone(), closing.clone());
        let (done, ok, permits) = (done.clone(), ok.clone(), permits.clone());
        tasks.push(tokio::spawn(async move {
            let user_id = format!("{}-i{j}", shared.cfg.run_id);
            let ws = {
                let _permit = permits.acquire().await;
                crate::user::connect_device(&shared, &user_id, "idle").await
            };
            done.fetch_add(1, Ordering::Relaxed);
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    shared.error(crate::user::connect_error_kind(&e));
                    return;
                }
            };
            ok.fetch_add(1, Ordering::Relaxed);
            shared.connections.fetch_add(1, Ordering::Relaxed);
            // Heartbeats spread over the period by device.
            let first = Instant::now() + HEARTBEAT.mul_f64((j as f64 * 0.618_034).fract());
            let mut beat = tokio::time::interval_at(first.into(), HEARTBEAT);
            let ended = loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(Message::Close(c))) => break Some(match c {
                            Some(f) => format!("close {}", u16::from(f.code)),
                            None => "close without a code".into(),
                        }),
                        Some(Ok(_)) => continue,
                        Some(Err(_)) => break Some("socket error".into()),
                        None => break Some("closed without a close frame".into()),
                    },
                    _ = beat.tick() => {
                        if ws.send(Message::text(r#"{"type":"heartbeat"}"#)).await.is_err() {
                            break Some("socket error".into());
                        }
                    }
                    _ = stop_rx.changed() => break None,
                }
            };
            if let Some(kind) = ended {
                if !closing.load(Ordering::Relaxed) {
                    shared.error(kind);
                }
            } else {
                let _ = ws.close(None).await;
            }
            shared.connections.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(10 * n as u64);
    let mut said = Instant::now();
    while done.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if said.elapsed() >= Duration::from_secs(5) {
            said = Instant::now();
            eprintln!(
                "  idle fleet: {} of {n} connected",
                ok.load(Ordering::Relaxed)
            );
        }
    }
    Fleet {
        stop,
        closing,
        tasks,
        connected: ok.load(Ordering::Relaxed),
        rss_before_kib,
        rss_after_kib: rss_kib(),
    }
}
