//! The plain-HTTP side of the server port: `/health`, `/metrics` and the media lane
//! (`POST /v1/media:prepare`, `PUT/GET /v1/media/{id}`), plus reading the request head that
//! tells a WebSocket upgrade from an HTTP request.
//!
//! One request per connection (`Connection: close`), bodies by `Content-Length` only, every
//! size bounded. Parsing uses `httparse`; the upgrade itself is left to tungstenite by
//! replaying the bytes already read (`Prefixed`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest request head accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Bytes of the head plus whatever followed it in the same reads.
    pub raw: Vec<u8>,
    /// Length of the head within `raw`.
    pub head_len: usize,
}

impl Head {
    /// A header value by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True for a WebSocket upgrade request.
    pub fn is_websocket(&self) -> bool {
        self.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    }
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed before a request")]
    Closed,
    #[error("request head too large")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads until a full request head has arrived.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Head, HeadError> {
    let mut raw = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        raw.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&raw) {
            Ok(httparse::Status::Complete(len)) => {
                let headers = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                return Ok(Head {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("").to_string(),
                    headers,
                    head_len: len,
                    raw,
                });
            }
            Ok(httparse::Status::Partial) => {
                if raw.len() > MAX_HEAD_BYTES {
                    return Err(HeadError::TooLarge);
                }
            }
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        }
    }
}

/// Reads a `Content-Length` body of at most `max` bytes (the part already read included).
pub async fn read_body<S: AsyncRead + Unpin>(
    s: &mut S,
    head: &Head,
    max: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, (u16, String)> {
    if head.header("transfer-encoding").is_some() {
        return Err((
            411,
            "send a Content-Length body, not chunked encoding".into(),
        ));
    }
    let len: usize = match head.header("content-length") {
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| (400, "bad Content-Length".to_string()))?,
        None => 0,
    };
    if len > max {
        return Err((413, format!("body exceeds {max} bytes")));
    }
    let mut body = head.raw[head.head_len..].to_vec();
    body.truncate(len);
    let mut rest = vec![0u8; len - body.len()];
    match tokio::time::timeout(timeout, s.read_exact(&mut rest)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err((400, "body shorter than Content-Length".to_string())),
        Err(_) => {
            return Err((
                408,
                format!("body not received within {} s", timeout.as_secs()),
            ))
        }
    }
    body.extend_from_slice(&rest);
    Ok(body)
}

/// Writes a complete response and closes the write side.
pub async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    s.shutdown().await
}

/// A JSON error body `{"error": {"code": .., "message": ..}}`.
pub fn error_json(code: u16, msg: &str) -> Vec<u8> {
    serde_json::json!({ "error": { "code": code, "message": msg } })
        .to_string()
        .into_bytes()
}

/// A stream that first yields bytes already read, then reads from `inner`. Lets the
/// WebSocket handshake see the request head we peeked at.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix` before `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Parses `Content-Range: bytes START-END/TOTAL` into (START, TOTAL).
pub fn content_range_start(v: &str) -> Option<u64> {
    let r = v.trim().strip_prefix("bytes")?.trim();
    let (range, _total) = r.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    start.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn head_is_parsed_and_replayed_for_the_upgrade() {
        let req = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nextra";
        let mut r = &req[..];
        let head = read_head(&mut r).await.expect("head");
        assert!(head.is_websocket());
        assert_eq!(head.path, "/ws");
        let mut p = Prefixed::new(head.raw.clone(), &b""[..]);
        let mut all = Vec::new();
        p.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, req.to_vec());
    }

    #[test]
    fn content_range_gives_the_start_offset() {
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_arrives_times_out_with_408() {
        let req = b"PUT /v1/media/m1 HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc";
        let (mut client, mut server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, req)
            .await
            .expect("write");
        let head = read_head(&mut server).await.expect("head");
        // 7 bytes are still owed and the client keeps the socket open without sending them.
        let r = read_body(&mut server, &head, 100, std::time::Duration::from_secs(60)).await;
        assert_eq!(r.map_err(|e| e.0), Err(408));
        drop(client);
    }

    #[tokio::test]
    async fn a_complete_body_is_read_within_the_timeout() {
        let req = b"PUT /v1/media/m1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde";
        let mut r = &req[..];
        let head = read_head(&mut r).await.expect("head");
        let body = read_body(&mut r, &head, 100, std::time::Duration::from_secs(1))
            .await
            .expect("body");
        assert_eq!(body, b"abcde");
    }
}
