//! Every story scenario plays, and its narration matches the reviewed snapshot in
//! `tests/snapshots/` byte for byte (the simulator is deterministic, so any change in the
//! protocol's behaviour or the narration shows up here). Regenerate after an intended
//! change with `UPDATE_SNAPSHOTS=1 cargo test -p sim --test playback_snapshots` and review
//! the diff.

use sim::playback::{html, narrate, Filter};
use sim::{RunOptions, Scenario};
use std::path::Path;

fn story(name: &str) -> (String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sc = Scenario::load(
        &root
            .join("../scenarios/stories")
            .join(format!("{name}.toml")),
    )
    .expect("story parses");
    let (r, o) = sim::run_seed(&sc, sc.seed, &RunOptions::default()).expect("runs");
    assert!(r.passed, "{name}: {:?}", r.failures);
    let lines = narrate(&o.ledger.trace, &Filter::default());
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let page = html(name, &lines, &o.ledger.trace, &Filter::default());
    (text, page)
}

fn check(name: &str) {
    let (text, page) = story(name);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &text).expect("write snapshot");
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert!(
        text == want,
        "{name}: narration differs from {}:\n--- got ---\n{text}",
        path.display()
    );
    assert!(
        page.contains("<svg") && page.contains(">chat<") && page.contains("u0/d0"),
        "{name}: diagram has its lanes"
    );
}

#[test]
fn one_send_story_narrates_every_hop() {
    check("one-send");
    let (text, _) = story("one-send");
    for hop in [
        "taps send",
        "→ gateway",
        "chat service",
        "registry",
        "✓ sent",
        "shows",
        "✓✓ delivered",
        "blue ticks",
    ] {
        assert!(text.contains(hop), "missing hop '{hop}'");
    }
    assert!(text.contains("ack only after the inbox write"));
}

#[test]
fn offline_inbox_story_shows_the_push_and_the_sync() {
    check("offline-inbox");
    let (text, _) = story("offline-inbox");
    assert!(text.contains("push → u1"));
    assert!(text.contains("push carries no text"));
}

#[test]
fn elevator_retry_story_shows_the_dedup() {
    check("elevator-retry");
    assert!(story("elevator-retry").0.contains("is a retry of seq"));
}

#[test]
fn bad_train_story_plays() {
    check("bad-train");
}

#[test]
fn reconnect_storm_story_counts_the_dropped_devices() {
    check("reconnect-storm");
    assert!(story("reconnect-storm")
        .0
        .contains("devices lose their socket"));
}

#[test]
fn region_failover_story_moves_the_phone_to_the_other_region() {
    check("region-failover");
    let (text, _) = story("region-failover");
    assert!(text.contains("FAULT regionfailover region=eu"));
    assert!(
        text.contains("u0/d0    connected to gw-us-0"),
        "alice reconnects in us"
    );
}

#[test]
fn slow_phone_story_shows_the_queue_overflow_and_the_resync() {
    check("slow-phone");
    let (text, _) = story("slow-phone");
    let full = text
        .find("the outbound queue is full")
        .expect("the server closes the slow socket");
    let back = text[full..]
        .find("u1/d0    connected to")
        .expect("the phone reconnects after the overflow");
    assert!(
        text[full + back..].contains("shows m8 (seq 12 of dm:u0:u1)"),
        "the last message arrives by sync after the reconnect"
    );
}

#[test]
fn typing_storm_story_throttles_and_coalesces_but_never_drops_messages() {
    check("typing-storm");
    let (text, _) = story("typing-storm");
    assert!(text.contains("dropped by the throttle"));
    assert!(
        text.lines()
            .any(|l| l.contains("coalesced)") && !l.contains("(0 coalesced)")),
        "a newer notice replaced a queued one on the slow phone's queue"
    );
    for seq in 1..=3 {
        assert!(
            text.lines()
                .any(|l| l.contains("u3/d0    shows")
                    && l.contains(&format!("(seq {seq} of grp:g1)"))),
            "seq {seq} reaches the slow phone"
        );
    }
}

#[test]
fn stadium_group_story_writes_once_and_refuses_to_grow_past_the_cap() {
    check("stadium-group");
    let (text, _) = story("stadium-group");
    assert!(text.contains("shared group log"));
    assert!(text.contains("admin asks to add u6"));
    assert!(text.contains("error 413 group would have 9 members; the cap is 8"));
}

#[test]
fn family_group_video_story_uploads_on_the_truck_lane_resumes_and_every_phone_downloads() {
    check("family-group-video");
    let (text, _) = story("family-group-video");
    let lines: Vec<&str> = text.lines().collect();
    let find = |from: usize, pat: &str| {
        (from..lines.len())
            .find(|&i| lines[i].contains(pat))
            .unwrap_or_else(|| panic!("no line with {pat:?} after line {from}"))
    };
    // Which send carries the video.
    let done = find(0, "upload of media1 complete: now ");
    let video = lines[done]
        .split("now ")
        .nth(1)
        .and_then(|x| x.split(' ').next())
        .expect("the video's cmid");
    let tapped = find(0, &format!("u0/d0    taps send: {video} in grp:g1"));
    let video_ack = find(0, &format!("u0/d0    ✓ sent: {video} "));
    // A text Mum tapped after the video was acked before the video's message: the fast
    // lane is not held up by the upload on the same phone.
    let overtaken = (tapped..video_ack).any(|i| {
        lines[i].contains("u0/d0    taps send: ")
            && lines[i].contains(" in dm:")
            && lines[i]
                .split("taps send: ")
                .nth(1)
                .and_then(|x| x.split(' ').next())
                .is_some_and(|cmid| {
                    (i..video_ack).any(|j| lines[j].contains(&format!("u0/d0    ✓ sent: {cmid} ")))
                })
    });
    assert!(overtaken, "a text tapped after the video is acked first");
    // After the app kill, the upload resumes where the server is, not from zero.
    let killed = find(0, "FAULT kill user=u0");
    let back = find(killed, "u0/d0    connected to");
    let next_chunk = lines[find(back, "media lane: media1 from u0:")];
    let received: u64 = next_chunk
        .split("from u0: ")
        .nth(1)
        .and_then(|x| x.split(' ').next())
        .and_then(|x| x.parse().ok())
        .expect("a byte count");
    assert!(received > 262_144, "resumed, not restarted: {next_chunk}");
    assert_eq!(
        text.matches("bytes from u0, intact").count(),
        39,
        "all 39 other members downloaded the exact file"
    );
}
