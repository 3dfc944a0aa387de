//! Every line the chat service logs during a run, checked for content: the oracle's
//! `plaintext` check covers the server's own log (all levels, whatever the terminal
//! shows) as well as its commits, pushes and trace lines. A log line leaks when it carries
//! the plaintext marker or any message body the phones sent (the ciphertext itself: a log
//! is no place for content, and keys leak too).
//!
//! A minimal `tracing` subscriber, installed for the simulation's thread only; it hands
//! everything on to the subscriber that was there before (the CLI's, with its filter), so
//! `RUST_LOG` still shows the server's lines.

use crate::crypto::PLAINTEXT_MARKER;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Event, Metadata, Subscriber};

/// Collects the log events of the server that carried the plaintext marker.
#[derive(Clone)]
pub struct LogCheck {
    hits: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<BTreeSet<String>>>,
    /// The subscriber in force when this one was made (events are passed on to it).
    inner: Dispatch,
}

impl Default for LogCheck {
    fn default() -> Self {
        LogCheck {
            hits: Arc::default(),
            bodies: Arc::default(),
            inner: tracing::dispatcher::get_default(|d| d.clone()),
        }
    }
}

struct Finder<'a> {
    bodies: &'a BTreeSet<String>,
    hit: bool,
}

impl Finder<'_> {
    fn check(&mut self, v: &str) {
        let b64 = |c: char| c.is_ascii_alphanumeric() || "+/=".contains(c);
        self.hit |= v.contains(PLAINTEXT_MARKER)
            || v.split(|c: char| !b64(c))
                .any(|t| t.len() >= 16 && self.bodies.contains(t));
    }
}

impl Visit for Finder<'_> {
    fn record_str(&mut self, _: &Field, v: &str) {
        self.check(v);
    }
    fn record_debug(&mut self, _: &Field, v: &dyn Debug) {
        self.check(&format!("{v:?}"));
    }
}

impl LogCheck {
    /// Watches for `body` (a message body as the phones send it) too.
    pub fn watch_body(&self, body: String) {
        if let Ok(mut b) = self.bodies.lock() {
            b.insert(body);
        }
    }

    fn found(&self, record: impl FnOnce(&mut Finder<'_>)) -> bool {
        let bodies = self.bodies.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = Finder {
            bodies: &bodies,
            hit: false,
        };
        record(&mut f);
        f.hit
    }

    /// Log events that carried plaintext: "LEVEL target: message-less description".
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().map(|h| h.clone()).unwrap_or_default()
    }

    fn note(&self, what: &Metadata<'_>) {
        if let Ok(mut h) = self.hits.lock() {
            h.push(format!(
                "{} {} ({})",
                what.level(),
                what.target(),
                what.name()
            ));
        }
    }
}

fn ours(m: &Metadata<'_>) -> bool {
    m.target().starts_with("model_server")
}

impl Subscriber for LogCheck {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        ours(m) || self.inner.enabled(m)
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        if ours(attrs.metadata()) && self.found(|f| attrs.record(f)) {
            self.note(attrs.metadata());
        }
        self.inner.new_span(attrs)
    }
    fn record(&self, id: &Id, values: &Record<'_>) {
        if self.found(|f| values.record(f)) {
            if let Ok(mut h) = self.hits.lock() {
                h.push("a span field".into());
            }
        }
        self.inner.record(id, values);
    }
    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.inner.record_follows_from(span, follows);
    }
    fn event(&self, e: &Event<'_>) {
        if ours(e.metadata()) && self.found(|f| e.record(f)) {
            self.note(e.metadata());
        }
        if self.inner.enabled(e.metadata()) {
            self.inner.event(e);
        }
    }
    fn enter(&self, id: &Id) {
        self.inner.enter(id);
    }
    fn exit(&self, id: &Id) {
        self.inner.exit(id);
    }
    fn clone_span(&self, id: &Id) -> Id {
        self.inner.clone_span(id)
    }
    fn try_close(&self, id: Id) -> bool {
        self.inner.try_close(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_log_line_with_plaintext_is_caught_at_any_level() {
        let check = LogCheck::default();
        check.watch_body("c2VhbGVkIGJvZHkgb2YgbTE=".into());
        tracing::subscriber::with_default(check.clone(), || {
            tracing::trace!(target: "model_server::core", body = "ciphertext", "fine");
            tracing::warn!(target: "model_server::core", msg = ?Some("c2VhbGVkIGJvZHkgb2YgbTE="), "x");
            tracing::debug!(target: "model_server::core", "{PLAINTEXT_MARKER}u0:m1");
            tracing::info!(target: "model_server::core", content = ?format!("{PLAINTEXT_MARKER}x"), "stored");
            tracing::info!(target: "elsewhere", "{PLAINTEXT_MARKER} not the server's");
        });
        assert_eq!(check.hits().len(), 3, "{:?}", check.hits());
    }

    /// Counts the events it is handed.
    struct Counter(Arc<std::sync::atomic::AtomicUsize>);

    impl Subscriber for Counter {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn every_event_is_passed_on_to_the_subscriber_that_was_there() {
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let outer = Dispatch::new(Counter(seen.clone()));
        tracing::dispatcher::with_default(&outer, || {
            let check = LogCheck::default();
            tracing::subscriber::with_default(check, || {
                tracing::info!(target: "model_server::core", "a server line");
                tracing::info!(target: "sim", "a simulator line");
            });
        });
        assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
