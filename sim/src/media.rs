//! The simulated phone's media lane: files travel over HTTP on their own short
//! connections, never on the WebSocket, so a big upload does not hold up text and ticks.
//!
//! The sender prepares an upload, PUTs it in chunks of the server's `chunk_size` (resuming
//! from the byte the server has after a failure), and only then sends the message, which
//! carries just the pointer. Each recipient device downloads the file and checks it is the
//! exact bytes that were sent. The bytes stand for ciphertext: seeded random, so the server
//! never sees anything readable.

pub use crate::device::Upload;
use crate::device::{dev, gateway_order, now_ms, Ctx};
use crate::ledger::DeviceKey;
use crate::plan::user_name;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The file a send carries: `len` seeded random bytes.
pub fn file_bytes(seed: u64, cmid: &str, len: u64) -> Vec<u8> {
    let h = cmid.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = SmallRng::seed_from_u64(seed ^ h ^ 0x006d_6564_6961);
    let mut v = vec![0u8; len as usize];
    rng.fill_bytes(&mut v);
    v
}

/// Longest one HTTP exchange may take, plus one second per MiB it carries.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Response bytes read beyond the file itself (head and JSON answers).
const RESPONSE_SLACK: usize = 64 * 1024;

/// What one exchange may take, for `bytes` of body either way.
fn timeout_for(bytes: u64) -> Duration {
    HTTP_TIMEOUT + Duration::from_secs(bytes / (1024 * 1024))
}

/// One HTTP/1.1 request on a fresh turmoil TCP connection (the server answers once and
/// closes). Returns the status and the body.
#[allow(clippy::too_many_arguments)]
async fn http(
    gw: &str,
    method: &str,
    path: &str,
    token: &str,
    headers: &str,
    body: &[u8],
    max_response: usize,
) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut s = turmoil::net::TcpStream::connect((gw, 8080))
            .await
            .map_err(|e| e.to_string())?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {gw}\r\nauthorization: Bearer {token}\r\n{headers}content-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        if !body.is_empty() {
            s.write_all(body).await.map_err(|e| e.to_string())?;
        }
        let mut resp = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            resp.extend_from_slice(&buf[..n]);
            if resp.len() > max_response + RESPONSE_SLACK {
                return Err("response too large".into());
            }
        }
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no response head")?;
        let status = std::str::from_utf8(&resp[..split])
            .ok()
            .and_then(|h| h.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or("bad status line")?;
        Ok((status, resp[split + 4..].to_vec()))
    };
    let carried = body.len().max(max_response) as u64;
    match tokio::time::timeout(timeout_for(carried), exchange).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

/// Refusals that a retry cannot change: the upload gives up (its message stays in the
/// outbox, which the oracle reports as liveness).
fn refusal_is_final(code: u16) -> bool {
    matches!(code, 400 | 401 | 403 | 413)
}

fn json_field<'a>(v: &'a serde_json::Value, k: &str) -> Option<&'a serde_json::Value> {
    v.get(k)
}

/// A final refusal of the upload: the app shows the message as not sent and drops it from
/// its outbox (the oracle judges whether the refusal was one the design allows).
fn give_up(ctx: &Ctx, k: DeviceKey, i: usize, code: u16) {
    let mut l = ctx.ledger.borrow_mut();
    if l.sends[i].acked.is_none() {
        l.sends[i].refused.get_or_insert((code, now_ms()));
        l.device(k).outbox.retain(|x| *x != i);
    }
}

/// Records how far the server has send `i`'s upload.
fn set_received(ctx: &Ctx, i: usize, received: u64, size: u64) {
    let mut u = ctx.uploads.borrow_mut();
    let e = u.entry(i).or_default();
    e.received = received;
    e.done = received == size;
}

/// Uploads send `i`'s file from device `k`, then marks it done so the session sends the
/// message. Stops (and lets the session start it again later) when the app goes away.
pub async fn upload(ctx: Rc<Ctx>, k: DeviceKey, i: usize) {
    let s = &ctx.plan.sends[i];
    let conv = ctx.send_conv[i].clone();
    let size = s.media_bytes;
    let file = file_bytes(ctx.seed, &s.cmid, size);
    let token = ctx.token(k.0, k.1);
    let gateways = gateway_order(&ctx, k);
    let generation = ctx.control(k).generation;
    let mut attempt = 0usize;
    let mut backoff = 500u64;
    let trace = |event: &str, detail: String| {
        ctx.ledger.borrow_mut().trace(
            now_ms(),
            dev(k),
            event,
            Some(&conv),
            None,
            Some(&s.cmid),
            detail,
        );
    };
    if let Some(st) = ctx.uploads.borrow().get(&i).filter(|u| u.received > 0) {
        trace(
            "media_resume",
            format!(
                "{} at byte {} of {size}",
                st.media_id.clone().unwrap_or_default(),
                st.received
            ),
        );
    }
    loop {
        let now = now_ms();
        let ctl = ctx.control(k);
        if now >= ctx.end_ms || ctl.generation != generation || ctl.away_until > now {
            break;
        }
        let st = ctx.uploads.borrow().get(&i).cloned().unwrap_or_default();
        if st.done {
            break;
        }
        let gw = &gateways[attempt % gateways.len()];
        let result = match &st.media_id {
            None => {
                let body = serde_json::json!({"conversation_id": conv, "file_type": "video/mp4", "file_size": size})
                    .to_string();
                trace("media_prepare", format!("{size} bytes"));
                match http(
                    gw,
                    "POST",
                    "/v1/media:prepare",
                    &token,
                    "",
                    body.as_bytes(),
                    0,
                )
                .await
                {
                    Ok((201, b)) => serde_json::from_slice::<serde_json::Value>(&b)
                        .ok()
                        .and_then(|v| {
                            let id = json_field(&v, "media_id")?.as_str()?.to_string();
                            let chunk = json_field(&v, "chunk_size")?.as_u64()?;
                            Some((id, chunk))
                        })
                        .ok_or_else(|| "prepare: 201 without media_id/chunk_size".to_string())
                        .map(|(id, chunk)| {
                            let mut u = ctx.uploads.borrow_mut();
                            let e = u.entry(i).or_default();
                            e.media_id = Some(id);
                            e.chunk_size = chunk.max(1);
                        }),
                    Ok((code, b)) => {
                        let why = format!("prepare: HTTP {code} {}", String::from_utf8_lossy(&b));
                        if refusal_is_final(code) {
                            trace("media_failed", why);
                            give_up(&ctx, k, i, code);
                            break;
                        }
                        Err(why)
                    }
                    Err(e) => Err(e),
                }
            }
            Some(id) => {
                let from = st.received;
                let to = (from + st.chunk_size).min(size);
                let headers = format!("content-range: bytes {from}-{}/{size}\r\n", to - 1);
                let put = http(
                    gw,
                    "PUT",
                    &format!("/v1/media/{id}"),
                    &token,
                    &headers,
                    &file[from as usize..to as usize],
                    0,
                )
                .await;
                match put {
                    Ok((200, b)) => serde_json::from_slice::<serde_json::Value>(&b)
                        .ok()
                        .and_then(|v| json_field(&v, "received").and_then(|x| x.as_u64()))
                        .ok_or_else(|| "chunk: 200 without received".to_string())
                        .map(|received| set_received(&ctx, i, received, size)),
                    // The server is elsewhere in the file: ask where, resume from there.
                    Ok((409, _)) => http(
                        gw,
                        "GET",
                        &format!("/v1/media/{id}/status"),
                        &token,
                        "",
                        &[],
                        0,
                    )
                    .await
                    .and_then(|(code, b)| {
                        serde_json::from_slice::<serde_json::Value>(&b)
                            .ok()
                            .filter(|_| code == 200)
                            .and_then(|v| json_field(&v, "received").and_then(|x| x.as_u64()))
                            .ok_or_else(|| format!("status: HTTP {code}"))
                    })
                    .map(|received| set_received(&ctx, i, received, size)),
                    // The upload expired or was lost: start a new one.
                    Ok((404, _)) => {
                        ctx.uploads.borrow_mut().insert(
                            i,
                            Upload {
                                running: true,
                                ..Upload::default()
                            },
                        );
                        Err("chunk: HTTP 404, upload gone: preparing a new one".into())
                    }
                    Ok((code, b)) => {
                        let why = format!("chunk: HTTP {code} {}", String::from_utf8_lossy(&b));
                        if refusal_is_final(code) {
                            trace("media_failed", why);
                            give_up(&ctx, k, i, code);
                            break;
                        }
                        Err(why)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(()) => {
                backoff = 500;
                let st = ctx.uploads.borrow().get(&i).cloned().unwrap_or_default();
                if st.done {
                    trace("media_uploaded", st.media_id.clone().unwrap_or_default());
                    break;
                }
            }
            Err(e) => {
                attempt += 1;
                trace("media_retry", e);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                backoff = (backoff * 2).min(8_000);
            }
        }
    }
    if let Some(u) = ctx.uploads.borrow_mut().get_mut(&i) {
        u.running = false;
    }
}

/// Downloads the file of send `i` to device `k` and checks it byte for byte.
pub async fn download(ctx: Rc<Ctx>, k: DeviceKey, i: usize, media_id: String) {
    let s = &ctx.plan.sends[i];
    let conv = ctx.send_conv[i].clone();
    let token = ctx.token(k.0, k.1);
    let gateways = gateway_order(&ctx, k);
    let mut backoff = 500u64;
    for attempt in 0usize.. {
        let now = now_ms();
        if now >= ctx.end_ms {
            break;
        }
        if ctx.control(k).away_until > now {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        let gw = &gateways[attempt % gateways.len()];
        let path = format!("/v1/media/{media_id}");
        match http(gw, "GET", &path, &token, "", &[], s.media_bytes as usize).await {
            Ok((200, body)) => {
                let intact = body == file_bytes(ctx.seed, &s.cmid, s.media_bytes);
                let mut l = ctx.ledger.borrow_mut();
                l.device(k).media.insert(i, intact);
                l.trace(
                    now_ms(),
                    dev(k),
                    "media_download",
                    Some(&conv),
                    None,
                    Some(&s.cmid),
                    format!(
                        "{media_id}: {} bytes from {}, {}",
                        body.len(),
                        user_name(s.user),
                        if intact { "intact" } else { "CORRUPT" }
                    ),
                );
                return;
            }
            Ok((code, _)) => ctx.ledger.borrow_mut().trace(
                now_ms(),
                dev(k),
                "media_retry",
                Some(&conv),
                None,
                Some(&s.cmid),
                format!("download: HTTP {code}"),
            ),
            Err(e) => ctx.ledger.borrow_mut().trace(
                now_ms(),
                dev(k),
                "media_retry",
                Some(&conv),
                None,
                Some(&s.cmid),
                format!("download: {e}"),
            ),
        }
        tokio::time::sleep(Duration::from_millis(backoff)).await;
        backoff = (backoff * 2).min(8_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_bytes_are_the_same_for_a_send_and_differ_between_sends() {
        assert_eq!(file_bytes(7, "m0", 1000), file_bytes(7, "m0", 1000));
        assert_ne!(file_bytes(7, "m0", 1000), file_bytes(7, "m1", 1000));
        assert_ne!(file_bytes(7, "m0", 1000), file_bytes(8, "m0", 1000));
        assert_eq!(file_bytes(1, "m0", 12_345).len(), 12_345);
    }
}
