//! Playback: a run's trace told one protocol hop per line, each with the design decision
//! behind it, and the same trace as a self-contained HTML sequence diagram.

use crate::ledger::TraceEvent;
use std::fmt::Write as _;

/// Which lines to keep.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this conversation (`dm:u0:u1`).
    pub conversation: Option<String>,
    /// Only this user's devices (`u0`), plus server hops about their conversations.
    pub user: Option<String>,
}

impl Filter {
    fn keeps(&self, e: &TraceEvent) -> bool {
        if e.event == "fault" {
            return true;
        }
        if let Some(c) = &self.conversation {
            if e.conv.as_deref() != Some(c.as_str()) {
                return false;
            }
        }
        if let Some(u) = &self.user {
            let mine = e.at.split('/').next() == Some(u.as_str());
            let about = e
                .conv
                .as_deref()
                .is_some_and(|c| c.split(':').any(|p| p == u))
                || e.detail.starts_with(&format!("{u}/"))
                || e.detail.starts_with(&format!("{u}:"))
                || e.detail.starts_with(&format!("{u} "))
                || e.detail == *u
                || e.detail.contains(&format!(" {u}:"));
            if !mine && !about {
                return false;
            }
        }
        true
    }
}

/// One narrated hop.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub t: u64,
    pub who: String,
    pub what: String,
    pub why: &'static str,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>9.3}s  {:<8} {}",
            self.t as f64 / 1000.0,
            self.who,
            self.what
        )?;
        if !self.why.is_empty() {
            write!(f, "\n{:>20}{}", "", self.why)?;
        }
        Ok(())
    }
}

fn seq(e: &TraceEvent) -> String {
    e.seq.map(|s| format!(" seq {s}")).unwrap_or_default()
}

/// Tells the trace, hop by hop. Each reason is given the first time its hop appears.
pub fn narrate(trace: &[TraceEvent], filter: &Filter) -> Vec<Line> {
    let mut out = Vec::new();
    let mut told = std::collections::BTreeSet::new();
    // (conversation, seq) of messages written to a group's shared log, not inboxes.
    let mut shared = std::collections::BTreeSet::new();
    for e in trace {
        if e.event == "stored" && e.detail.contains("shared group log") {
            shared.insert((e.conv.clone(), e.seq));
        }
    }
    for (i, e) in trace.iter().enumerate() {
        // The end-of-run presence probe checks the server; it is not part of the story.
        if !filter.keeps(e) || e.event == "presence_subscribe" {
            continue;
        }
        let conv = e.conv.clone().unwrap_or_default();
        let cmid = e.cmid.clone().unwrap_or_default();
        let (what, why): (String, &'static str) = match e.event.as_str() {
            "tap" => (format!("taps send: {cmid} in {conv}"), "it lands in the phone's local outbox first, which survives the app being killed"),
            "send" if e.detail.starts_with("retry") => (
                format!("→ gateway: message {cmid} in {conv} again ({}: no ack yet)", e.detail),
                "the same client_message_id rides every retry, so the server can spot duplicates",
            ),
            "send" => (format!("→ gateway: message {cmid} in {conv}"), "the same client_message_id rides every retry, so the server can spot duplicates"),
            "stored" if e.detail.contains("shared group log") => (
                format!("chat service: {cmid} is{} of {conv} ({})", seq(e), e.detail),
                "a big group: one write to the group's shared log instead of a copy per member; members read it with a cursor",
            ),
            "stored" => (
                format!("chat service: {cmid} is{} of {conv} ({})", seq(e), e.detail),
                "dedup on (sender, client_message_id), next seq of this chat, message and inbox copies in one commit",
            ),
            "dedup" => (
                format!("chat service: {cmid} is a retry of{}: 409 with the original seq, nothing stored", seq(e)),
                "at-least-once delivery plus dedup: a retried send never shows twice",
            ),
            "ack" if e.detail == "again" => (format!("✓ again for {cmid} ({})", seq(e).trim()), "a retry's answer: the phone already showed one tick"),
            "ack" if shared.contains(&(e.conv.clone(), e.seq)) => (
                format!("✓ sent: {cmid} is{} of {conv}", seq(e)),
                "ack only after the write to the group log: this is why nothing acked is lost",
            ),
            "ack" => (format!("✓ sent: {cmid} is{} of {conv}", seq(e)), "ack only after the inbox write: this is why nothing acked is lost"),
            "routed" => (
                format!("registry: {} → queued on its live socket ({})", e.detail, seq(e).trim()),
                "the user→gateway registry finds every online device, on any gateway; the phone has it only when its link delivers it",
            ),
            "push" => (format!("push → {}", e.detail), "push carries no text: it only wakes the phone; the inbox is the truth"),
            "deliver" if e.detail == "undecryptable" => (format!("got{} of {conv} but cannot decrypt it", seq(e)), ""),
            "deliver" => (format!("shows {cmid} ({} of {conv}) and acks it", seq(e).trim()), "decrypted on the phone; the delivery_ack turns the sender's tick into two"),
            "delivery_receipt" => (format!("✓✓ delivered in {conv} ({})", e.detail), "status only moves forward: sent → delivered → read"),
            "read_receipt" => (format!("blue ticks: read in {conv} ({})", e.detail), "the recipient opened the chat; receipts never go backward"),
            "status_query" => (
                format!("asks where its ticks are: {}", e.detail),
                "receipts are pushed once; a phone whose socket was down asks for the ones it missed",
            ),
            "group_receipt" => (
                format!("group ticks for{} of {conv}: {}", seq(e), e.detail),
                "in a group the sender gets counts, aggregated per message, not a receipt per member",
            ),
            "connected" => (format!("connected to {} and syncs everything after its last seq", e.detail), "sync on reconnect is how an offline phone catches up, in seq order"),
            "disconnected" => (format!("lost its socket ({})", e.detail), "it will reconnect with jittered exponential backoff, not all at once"),
            "backoff" => (
                match e.detail.split_once(" ms of ") {
                    Some((wait, cap)) => format!("waits {wait} ms before reconnecting (a random pick up to {cap} ms)"),
                    None => format!("waits {} before reconnecting", e.detail),
                },
                "full jitter: each phone picks its own wait up to the backoff, which doubles after each failure up to a cap",
            ),
            "connect_failed" => (format!("could not connect ({})", e.detail), "backoff doubles up to a cap, with jitter, so a storm spreads out"),
            "app_away" => ("app in the background / killed: socket gone".into(), "messages for it wait in its inbox; its own taps wait in its outbox"),
            "battery_dead" => ("battery dead: gone without closing its socket".into(), "no FIN: the server learns it only from missed heartbeats or a full queue; the inbox keeps what it misses"),
            "error" if e.detail.starts_with("503") => (
                format!("error {}", e.detail),
                "the resume token lets the phone reconnect and sync instead of replaying its whole history",
            ),
            "error" if e.detail.starts_with("413") => (
                format!("error {}", e.detail),
                "the product sets a cap: past it, one send would mean too many copies or reads",
            ),
            "error" => (format!("error {}", e.detail), ""),
            "media_prepare" => (
                format!("truck lane: asks for an upload slot for {} in {conv}", e.detail),
                "big files never ride the WebSocket: text and ticks keep the fast lane",
            ),
            "media_prepared" => (format!("media lane: reserved {}", e.detail), ""),
            "media_chunk" => (
                format!("media lane: {}", e.detail),
                "uploaded in chunks over HTTP, each stored before the next is sent",
            ),
            "media_uploaded" => (
                format!("upload of {} complete: now {cmid} can go, carrying only the pointer", e.detail),
                "the message holds a pointer (and, end-to-end encrypted, the file's key), never the bytes",
            ),
            "media_resume" => (
                format!("resumes the upload of {}", e.detail),
                "after a break the upload goes on from the byte the server has, not from zero",
            ),
            "media_retry" => (format!("media lane hiccup ({}): retries with backoff", e.detail), ""),
            "media_failed" => (format!("media lane refused the upload ({}): the message stays unsent", e.detail), ""),
            "media_fetched" => (
                format!("media lane: serves {}", e.detail),
                "only members of the chat may fetch it; in production a CDN serves the bytes",
            ),
            "media_download" => (
                format!("downloads {}", e.detail),
                "every recipient's phone pulls the file itself after the message arrives: one download per phone",
            ),
            "group_add" => (
                format!("admin asks to add {}", e.detail),
                "only admins may add members, and the server checks the size cap on every add",
            ),
            "slow_consumer" => (
                format!("chat service: {}: the outbound queue is full, so it drops them and closes the socket with a resume token (error 503)", e.detail),
                "a bounded queue per connection: one slow phone cannot eat the server's memory; its messages wait in the inbox",
            ),
            "typing" => (format!("types in {conv} → gateway"), "typing notices ride the fast lane but are disposable"),
            "typing_fwd" => (
                format!("chat service: typing from {}", e.detail),
                "at most one notice per user per chat every typing_min_interval_ms (2 s by default); a newer notice replaces one still queued; shed first under pressure",
            ),
            "typing_throttled" => (
                format!("chat service: typing from {} dropped by the throttle", e.detail),
                "throttled, not queued: a keystroke storm costs the server almost nothing",
            ),
            "typing_seen" => (format!("sees \"{} is typing…\" in {conv}", e.detail), ""),
            "device_unlink" => (
                format!("asks the server to unlink {}", e.detail),
                "an unlinked device's tokens stop working, and nothing waits for it any more",
            ),
            "device_unlinked" => (format!("{} is unlinked, durably", e.detail), ""),
            "logged_out" => ("is logged out: its old token is refused".to_string(), ""),
            "fault" => {
                // Count the sockets a fault knocks off when it starts, not when it ends.
                let starts = e.detail.split_whitespace().nth(1) != Some("ends");
                let lost = trace[i..]
                    .iter()
                    .take_while(|x| starts && x.t <= e.t + 2_000)
                    .filter(|x| x.event == "disconnected")
                    .count();
                let tail = match lost {
                    0 => String::new(),
                    1 => ": 1 device loses its socket and reconnects with jittered backoff".to_string(),
                    n => format!(": {n} devices lose their socket and reconnect with jittered backoff"),
                };
                (format!("FAULT {}{tail}", e.detail), fault_why(&e.detail))
            }
            other => (format!("{other} {}", e.detail), ""),
        };
        let why = if told.insert(why) { why } else { "" };
        out.push(Line {
            t: e.t,
            who: e.at.clone(),
            what,
            why,
        });
    }
    out
}

/// Why a fault matters, by its kind (the first word of its trace detail).
fn fault_why(detail: &str) -> &'static str {
    let ends = detail.split_whitespace().nth(1) == Some("ends");
    match detail.split_whitespace().next().unwrap_or("") {
        _ if ends => "",
        "partition" => "segments between these hosts are dropped: streams stall until a timeout notices",
        "hold" => "segments are held, not lost: everything arrives late, in a burst",
        "flaky" => "links fail at random, as on a bad mobile network",
        "latency" => "every segment on this link is slow",
        "crash" => "a crash keeps only what was durably written: that is why the ack waits for the write",
        "deploy" => "a restart drops every socket on the gateway at once: a reconnect storm",
        "regionfailover" => "the region's gateways go dark and the store's primary moves to the surviving region; phones reconnect there",
        "offline" => "the app is in the background: no socket, so messages wait in the inbox and a push wakes the phone",
        "kill" => "the app is killed: its outbox and uploads survive on the phone and resume when it comes back",
        "batterydeath" => "the phone dies without closing its socket: the server still routes to it until its own timeouts notice",
        "slowconsumer" => "the phone reads slowly: the server's bounded queue for it fills",
        "clockskew" => "the phone's clock is wrong: order comes from the server's seq, never from phone clocks",
        "crashpoint" => "the chat service will crash at an exact point of its work: what was committed stays, what was only queued is lost",
        "crash_point" => "the chat service crashed at that point: phones resend what was not acked, and dedup answers with the original seq",
        "storeerrors" => "the store fails commits: nothing of a failed frame is applied, and its connection closes so the phone resends in order",
        "pause" => "the process is frozen while everyone else's timers run: on waking it finds every deadline passed at once",
        "slowhandler" => "every frame waits before it is handled: acks come late and phones resend",
        "clockjump" => "the server's clock steps: timeouts and rate windows must not assume time only moves forward",
        _ => "",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The gateway named in a detail such as `from u1 via gw-eu-0; …` or `u0/d0 on gw-eu-0`.
fn gateway_in(detail: &str) -> Option<&str> {
    detail
        .split(|c: char| c.is_whitespace() || c == ';' || c == ':' || c == ',')
        .find(|w| w.starts_with("gw-"))
}

/// Which lanes one hop's arrow joins, given where each device is connected now.
fn arrow(e: &TraceEvent, at_gw: &std::collections::BTreeMap<String, String>) -> (String, String) {
    let dev = e.at.clone();
    let gw_of_dev = || at_gw.get(&dev).cloned().unwrap_or_else(|| "chat".into());
    match e.event.as_str() {
        "connected" => (
            dev.clone(),
            gateway_in(&e.detail).unwrap_or("chat").to_string(),
        ),
        "send" | "media_prepare" | "typing" | "group_add" | "status_query" => {
            (dev.clone(), gw_of_dev())
        }
        "media_chunk" | "media_prepared" => {
            let uploader = e
                .detail
                .split(" from ")
                .nth(1)
                .and_then(|x| x.split(':').next());
            let gw = uploader
                .and_then(|u| at_gw.iter().find(|(d, _)| d.split('/').next() == Some(u)))
                .map(|(_, g)| g.clone())
                .unwrap_or_else(|| "chat".into());
            (gw, "chat".into())
        }
        "stored" => (
            gateway_in(&e.detail).unwrap_or("chat").to_string(),
            "chat".into(),
        ),
        "routed" => (
            "chat".into(),
            gateway_in(&e.detail).unwrap_or("chat").to_string(),
        ),
        "push" => ("chat".into(), "push".into()),
        "ack" | "deliver" | "delivery_receipt" | "read_receipt" | "error" | "typing_seen"
        | "media_download" => (gw_of_dev(), dev.clone()),
        _ => (dev.clone(), dev),
    }
}

/// A self-contained page: one swimlane per host (phones, gateways, the chat service and
/// push), one arrow per hop, faults marked; Next/Previous (or arrow keys) step through it,
/// and `#step=N` in the address opens it at hop N.
pub fn html(title: &str, lines: &[Line], trace: &[TraceEvent], filter: &Filter) -> String {
    let kept: Vec<&TraceEvent> = trace.iter().filter(|e| filter.keeps(e)).collect();
    let mut devices: Vec<String> = Vec::new();
    let mut gateways: Vec<String> = Vec::new();
    for e in &kept {
        if e.at.contains('/') && !devices.contains(&e.at) {
            devices.push(e.at.clone());
        }
        if let Some(g) = gateway_in(&e.detail) {
            if !gateways.iter().any(|x| x == g) {
                gateways.push(g.to_string());
            }
        }
    }
    gateways.sort();
    // Phones in user order (u2 before u10); the server's lanes first, so they stay on
    // screen however many phones a story has.
    devices.sort_by_key(|d| {
        let num = |p: Option<&str>| {
            p.and_then(|x| {
                x.trim_start_matches(|c: char| !c.is_ascii_digit())
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(u64::MAX)
        };
        let mut parts = d.split('/');
        (num(parts.next()), num(parts.next()), d.clone())
    });
    let mut lanes: Vec<String> = vec!["push".into(), "chat".into()];
    lanes.extend(gateways);
    lanes.extend(devices);
    let lane_x = |name: &str| 90 + 150 * lanes.iter().position(|l| l == name).unwrap_or(0);
    // Room on the right for the labels of hops drawn on the last lanes.
    let width = 90 + 150 * lanes.len() + 260;
    let row_h = 34;
    let height = 60 + row_h * kept.len();
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">");
    svg.push_str("<defs><marker id=\"a\" markerWidth=\"8\" markerHeight=\"8\" refX=\"7\" refY=\"4\" orient=\"auto\"><path d=\"M0,0 L8,4 L0,8 z\" fill=\"#333\"/></marker></defs>");
    for l in &lanes {
        let x = lane_x(l);
        let _ = write!(svg, "<text class=\"lane\" x=\"{x}\" y=\"20\" text-anchor=\"middle\" font-weight=\"bold\">{}</text><line x1=\"{x}\" y1=\"28\" x2=\"{x}\" y2=\"{height}\" stroke=\"#bbb\" stroke-dasharray=\"4 3\"/>", esc(l));
    }
    let mut at_gw = std::collections::BTreeMap::new();
    for (i, (e, line)) in kept.iter().zip(lines).enumerate() {
        let y = 50 + row_h * i;
        if e.event == "connected" {
            if let Some(g) = gateway_in(&e.detail) {
                at_gw.insert(e.at.clone(), g.to_string());
            }
        }
        let (from, to) = arrow(e, &at_gw);
        let (x1, x2) = (lane_x(&from), lane_x(&to));
        let colour = if e.event == "fault" { "#b00" } else { "#333" };
        let _ = write!(svg, "<g class=\"step\" data-i=\"{i}\">");
        if e.event == "fault" {
            let _ = write!(
                svg,
                "<rect x=\"0\" y=\"{}\" width=\"{width}\" height=\"{}\" fill=\"#fdd\"/>",
                y - 14,
                row_h - 6
            );
        } else if x1 != x2 {
            let _ = write!(svg, "<line x1=\"{x1}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"{colour}\" marker-end=\"url(#a)\"/>");
        } else {
            let _ = write!(
                svg,
                "<circle cx=\"{x1}\" cy=\"{y}\" r=\"4\" fill=\"{colour}\"/>"
            );
        }
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{:.3}s {}</text></g>",
            x1.min(x2) + 6,
            y - 4,
            line.t as f64 / 1000.0,
            esc(&line.what)
        );
    }
    svg.push_str("</svg>");
    let mut list = String::new();
    for (i, l) in lines.iter().enumerate() {
        let _ = write!(
            list,
            "<li data-i=\"{i}\"><b>{:.3}s {}</b> {}<br><i>{}</i></li>",
            l.t as f64 / 1000.0,
            esc(&l.who),
            esc(&l.what),
            esc(l.why)
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>\
body{{font-family:sans-serif;margin:1em}}#bar{{position:sticky;top:0;background:#fff;padding:6px 0}}\
.step{{opacity:.25}}.step.on{{opacity:1}}.step.now text{{font-weight:bold}}li{{opacity:.35;margin:2px 0}}li.on{{opacity:1}}li.now{{background:#ffd}}\
#wrap{{display:flex;gap:1em}}#diagram{{overflow:auto;max-height:85vh}}ol{{max-height:85vh;overflow:auto;width:34em;flex:none;font-size:13px}}</style></head><body>\
<h1>{t}</h1><div id=\"bar\"><button id=\"prev\">◀ Previous</button> <button id=\"next\">Next ▶</button> <button id=\"all\">Show all</button> <span id=\"pos\"></span></div>\
<div id=\"wrap\"><div id=\"diagram\">{svg}</div><ol>{list}</ol></div>\
<script>let i=-1;const n={n};const s=document.querySelectorAll('.step'),l=document.querySelectorAll('li');\
function show(k){{i=Math.max(-1,Math.min(n-1,k));s.forEach(e=>{{const j=+e.dataset.i;e.classList.toggle('on',j<=i);e.classList.toggle('now',j==i)}});\
l.forEach(e=>{{const j=+e.dataset.i;e.classList.toggle('on',j<=i);e.classList.toggle('now',j==i)}});document.getElementById('pos').textContent=(i+1)+' / '+n;\
const c=document.querySelector('li.now');if(c)c.scrollIntoView({{block:'nearest'}});\
const g=document.querySelector('.step.now');if(g)g.scrollIntoView({{block:'center',inline:'nearest'}});}}\
document.getElementById('next').onclick=()=>show(i+1);document.getElementById('prev').onclick=()=>show(i-1);document.getElementById('all').onclick=()=>show(n-1);\
document.onkeydown=e=>{{if(e.key=='ArrowRight')show(i+1);if(e.key=='ArrowLeft')show(i-1)}};\
function fromHash(){{const h=location.hash.match(/^#step=(\\d+)$/);show(h?Math.max(1,+h[1])-1:0)}}window.onhashchange=fromHash;fromHash();</script></body></html>",
        t = esc(title),
        n = lines.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: &str, event: &str, conv: Option<&str>, detail: &str) -> TraceEvent {
        TraceEvent {
            t: 0,
            at: at.into(),
            event: event.into(),
            conv: conv.map(Into::into),
            seq: None,
            cmid: None,
            detail: detail.into(),
        }
    }

    #[test]
    fn user_filter_keeps_the_server_hops_that_name_the_user() {
        let f = Filter {
            user: Some("u0".into()),
            ..Filter::default()
        };
        let keep = [
            ev("u0/d0", "send", Some("grp:g1"), ""),
            ev(
                "chat",
                "media_chunk",
                Some("grp:g1"),
                "media1 from u0: 1 of 2 bytes",
            ),
            ev(
                "chat",
                "media_fetched",
                Some("grp:g1"),
                "media1 to u0: 2 bytes",
            ),
            ev(
                "chat",
                "typing_fwd",
                Some("grp:g1"),
                "u0 to 3 devices (0 coalesced)",
            ),
            ev("chat", "typing_throttled", Some("grp:g1"), "u0"),
            ev("chat", "routed", Some("grp:g1"), "u0/d0 on gw-eu-0"),
            ev("sim", "fault", None, "kill user=u3"),
        ];
        for e in &keep {
            assert!(f.keeps(e), "keeps {e:?}");
        }
        let drop = [
            ev("u10/d0", "send", Some("grp:g1"), ""),
            ev(
                "chat",
                "media_fetched",
                Some("grp:g1"),
                "media1 to u10: 2 bytes",
            ),
            ev("chat", "typing_throttled", Some("grp:g1"), "u01"),
        ];
        for e in &drop {
            assert!(!f.keeps(e), "drops {e:?}");
        }
    }

    #[test]
    fn conversation_filter_keeps_media_hops_of_that_chat() {
        let f = Filter {
            conversation: Some("grp:g1".into()),
            ..Filter::default()
        };
        assert!(f.keeps(&ev("chat", "media_chunk", Some("grp:g1"), "x")));
        assert!(!f.keeps(&ev("chat", "media_chunk", Some("grp:g2"), "x")));
    }

    #[test]
    fn each_reason_is_told_once() {
        let trace = [
            ev("u0/d0", "tap", Some("dm:u0:u1"), ""),
            ev("u0/d0", "tap", Some("dm:u0:u1"), ""),
        ];
        let lines = narrate(&trace, &Filter::default());
        assert!(!lines[0].why.is_empty());
        assert!(lines[1].why.is_empty());
    }
}
