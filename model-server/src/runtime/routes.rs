//! HTTP routes on the server port: health, metrics and the media lane.
//!
//! Media requests authenticate with `Authorization: Bearer <token>` (the same tokens as
//! the WebSocket `auth` frame); the core decides who may upload, read or download.

use super::http::{self, Head};
use super::{lock, Server};
use crate::auth;
use crate::core::MediaError;
use crate::ids::{MediaId, UserId};
use crate::protocol::MediaPreparePayload;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

const JSON: &str = "application/json";

impl Server {
    fn bearer_user(&self, head: &Head) -> Result<UserId, (u16, String)> {
        let token = head
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or((401, "missing Authorization: Bearer <token>".to_string()))?;
        let (user, device) = auth::claims(token).ok_or((401, "malformed token".to_string()))?;
        let now = self.now();
        let core = lock(&self.hub.core);
        auth::verify(core.secret(), token, &user, &device, now)
            .map_err(|e| (401, e.to_string()))?;
        // An unlinked device's tokens are revoked here too (PROTOCOL §4.15).
        match core.device_unlinked(&user, &device) {
            Ok(false) => Ok(user),
            Ok(true) => Err((401, "device unlinked".to_string())),
            Err(e) => Err((503, format!("storage unavailable: {e}"))),
        }
    }

    /// Answers one plain HTTP request.
    pub(super) async fn handle_http<St>(self: Arc<Self>, mut stream: St, head: Head)
    where
        St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let path = head.path.split('?').next().unwrap_or("").to_string();
        let result: Result<(u16, &str, Vec<u8>), (u16, String)> =
            match (head.method.as_str(), path.as_str()) {
                ("GET", "/health") => Ok((200, JSON, br#"{"status":"ok"}"#.to_vec())),
                ("GET", "/metrics") => Ok((
                    200,
                    "text/plain; version=0.0.4",
                    super::metrics::render(&self).into_bytes(),
                )),
                ("POST", "/v1/media:prepare") => self.media_prepare(&mut stream, &head).await,
                (m, p) if p.starts_with("/v1/media/") => {
                    let rest = &p["/v1/media/".len()..];
                    let (id, status) = match rest.strip_suffix("/status") {
                        Some(id) => (id, true),
                        None => (rest, false),
                    };
                    let id = MediaId(id.to_string());
                    match (m, status) {
                        ("PUT", false) => self.media_put(&mut stream, &head, &id).await,
                        ("GET", true) => self.media_status(&head, &id),
                        ("GET", false) => {
                            // Streamed chunk by chunk; answers errors itself.
                            self.media_download(&mut stream, &head, &id).await;
                            return;
                        }
                        _ => Err((405, "method not allowed".into())),
                    }
                }
                _ => Err((404, "no such route; the WebSocket endpoint is /ws".into())),
            };
        // Group commit: a media answer (success or error) tells of the store's state (an
        // upload prepared, a chunk stored, the byte an upload is at), which must be
        // durable first.
        let result = if path.starts_with("/v1/media")
            && !self.hub.settled_now(self.cfg.write_timeout).await
        {
            Err((503, "storage unavailable: not durable; retry".to_string()))
        } else {
            result
        };
        let _ = match result {
            Ok((code, ct, body)) => http::respond(&mut stream, code, ct, &body).await,
            Err((code, msg)) => {
                http::respond(&mut stream, code, JSON, &http::error_json(code, &msg)).await
            }
        };
    }

    async fn media_prepare<St: AsyncRead + Unpin>(
        &self,
        stream: &mut St,
        head: &Head,
    ) -> Result<(u16, &'static str, Vec<u8>), (u16, String)> {
        let user = self.bearer_user(head)?;
        let body = http::read_body(stream, head, 4096, self.cfg.body_timeout).await?;
        let req: MediaPreparePayload = serde_json::from_slice(&body)
            .map_err(|e| (400, format!("bad JSON body: {}", e.classify_str())))?;
        let now = self.now();
        let prepared = lock(&self.hub.core)
            .media_prepare(&user, req, now)
            .map_err(media_err)?;
        Ok((201, JSON, serde_json::to_vec(&prepared).unwrap_or_default()))
    }

    async fn media_put<St: AsyncRead + Unpin>(
        &self,
        stream: &mut St,
        head: &Head,
        id: &MediaId,
    ) -> Result<(u16, &'static str, Vec<u8>), (u16, String)> {
        let user = self.bearer_user(head)?;
        let offset = match head.header("content-range") {
            Some(v) => {
                http::content_range_start(v).ok_or((400, "bad Content-Range".to_string()))?
            }
            None => 0,
        };
        let max = lock(&self.hub.core).limits().media_chunk_bytes;
        let body = http::read_body(stream, head, max, self.cfg.body_timeout).await?;
        let now = self.now();
        let st = lock(&self.hub.core)
            .media_put(&user, id, offset, &body, now)
            .map_err(media_err)?;
        Ok((200, JSON, serde_json::to_vec(&st).unwrap_or_default()))
    }

    fn media_status(
        &self,
        head: &Head,
        id: &MediaId,
    ) -> Result<(u16, &'static str, Vec<u8>), (u16, String)> {
        let user = self.bearer_user(head)?;
        let now = self.now();
        let st = lock(&self.hub.core)
            .media_status(&user, id, now)
            .map_err(media_err)?;
        Ok((200, JSON, serde_json::to_vec(&st).unwrap_or_default()))
    }

    /// `GET /v1/media/{id}`: the file, written one stored chunk at a time so neither the
    /// whole file nor the core's lock is held while a slow client reads; each write is
    /// bounded by `write_timeout`.
    async fn media_download<St: AsyncWrite + Unpin>(
        &self,
        stream: &mut St,
        head: &Head,
        id: &MediaId,
    ) {
        let opened = self.bearer_user(head).and_then(|user| {
            let now = self.now();
            lock(&self.hub.core)
                .media_open(&user, id, now)
                .map_err(media_err)
        });
        // Group commit: serve only bytes (and answers) that are durable.
        let opened = if self.hub.settled_now(self.cfg.write_timeout).await {
            opened
        } else {
            Err((503, "storage unavailable: not durable; retry".to_string()))
        };
        let size = match opened {
            Ok((_file_type, size)) => size,
            Err((code, msg)) => {
                let _ = http::respond(stream, code, JSON, &http::error_json(code, &msg)).await;
                return;
            }
        };
        let timeout = self.cfg.write_timeout;
        // Media is ciphertext to the server: always served as opaque bytes.
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
        );
        if !matches!(
            tokio::time::timeout(timeout, stream.write_all(head.as_bytes())).await,
            Ok(Ok(()))
        ) {
            return;
        }
        let mut sent = 0u64;
        while sent < size {
            let chunk = lock(&self.hub.core).media_read(id, sent);
            let Ok(Some(mut chunk)) = chunk else {
                // Deleted or expired meanwhile: the short body tells the client.
                tracing::debug!(media = %id, sent, "media vanished during download");
                return;
            };
            chunk.truncate((size - sent) as usize);
            if chunk.is_empty() {
                return;
            }
            if !matches!(
                tokio::time::timeout(timeout, stream.write_all(&chunk)).await,
                Ok(Ok(()))
            ) {
                return;
            }
            sent += chunk.len() as u64;
        }
        let _ = tokio::time::timeout(timeout, async {
            stream.flush().await?;
            stream.shutdown().await
        })
        .await;
    }
}

fn media_err(e: MediaError) -> (u16, String) {
    (e.status(), e.to_string())
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Data => "missing or mistyped field",
            _ => "malformed JSON",
        }
    }
}
