//! The media lane: prepare, chunked resumable upload, member-only download, expiry.
//!
//! Seed 002's "truck lane": big files never ride the message path. A client prepares an
//! upload for a conversation, PUTs chunks at the offset the server has (resuming after a
//! break from the last received byte), and then sends a message carrying only the
//! `media_id`. Only members of that conversation may download it.

use super::{ChatCore, Reject};
use crate::ids::{ConversationId, MediaId, Millis, UserId};
use crate::protocol::{ErrorPayload, MediaPreparePayload, MediaPrepared};
use crate::store::records::{enc, key, media_chunk_key, MediaRecord};
use crate::store::{KvStore, StoreError, Table, Write};

/// Uploads one sweep looks at.
const MEDIA_SWEEP_SCAN: usize = 1024;

/// A media request refused, with the HTTP status that says why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MediaError {
    #[error("{0}")]
    BadRequest(String),
    #[error("not allowed")]
    Forbidden,
    #[error("no such media (or it expired)")]
    NotFound,
    #[error("upload is at byte {received}; resume from there")]
    WrongOffset { received: u64 },
    #[error("upload is not complete")]
    Incomplete,
    #[error("{0}")]
    TooLarge(String),
    #[error("storage unavailable")]
    Store,
}

impl MediaError {
    /// HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            MediaError::BadRequest(_) => 400,
            MediaError::Forbidden => 403,
            MediaError::NotFound => 404,
            MediaError::WrongOffset { .. } | MediaError::Incomplete => 409,
            MediaError::TooLarge(_) => 413,
            MediaError::Store => 503,
        }
    }

    /// The same refusal as a protocol error frame.
    pub fn to_error(&self) -> ErrorPayload {
        ErrorPayload::new(self.status(), self.to_string())
    }
}

impl From<StoreError> for MediaError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error in media lane");
        MediaError::Store
    }
}

impl From<Reject> for MediaError {
    fn from(r: Reject) -> Self {
        match r.0.code {
            403 => MediaError::Forbidden,
            404 => MediaError::NotFound,
            503 => MediaError::Store,
            _ => MediaError::BadRequest(r.0.message),
        }
    }
}

/// Progress of an upload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MediaStatus {
    pub media_id: MediaId,
    pub size: u64,
    pub received: u64,
    pub complete: bool,
}

impl<S: KvStore> ChatCore<S> {
    fn member_of(&self, user: &UserId, conv: &ConversationId) -> Result<(), MediaError> {
        let kind = conv
            .kind()
            .ok_or_else(|| MediaError::BadRequest("unknown conversation_id".into()))?;
        self.check_member(user, &kind).map_err(MediaError::from)
    }

    /// `POST /v1/media:prepare`: reserves a media id for an upload into `conversation_id`.
    pub fn media_prepare(
        &mut self,
        user: &UserId,
        p: MediaPreparePayload,
        now: Millis,
    ) -> Result<MediaPrepared, MediaError> {
        self.member_of(user, &p.conversation_id)?;
        if p.file_size == 0 {
            return Err(MediaError::BadRequest("file_size must be positive".into()));
        }
        if p.file_size > self.cfg.max_media_bytes {
            return Err(MediaError::TooLarge(format!(
                "file_size exceeds {} bytes",
                self.cfg.max_media_bytes
            )));
        }
        if p.file_type.len() > 128 {
            return Err(MediaError::BadRequest("file_type is too long".into()));
        }
        let (n, counter) = self.db.next_counter("media")?;
        let id = MediaId(format!("media{n}"));
        let rec = MediaRecord {
            media_id: id.clone(),
            owner: user.clone(),
            conversation_id: p.conversation_id,
            file_type: p.file_type,
            size: p.file_size,
            received: 0,
            created_at: now,
            expires_at: now.plus(self.cfg.media_upload_ttl_ms),
        };
        self.db.commit(vec![
            counter,
            Write::Put(Table::Media, key(&[id.as_str()], None), enc(&rec)),
        ])?;
        self.log(|| super::CoreEvent::MediaPrepared {
            at: now,
            media_id: id.clone(),
            user: user.clone(),
            conversation: rec.conversation_id.clone(),
            size: rec.size,
        });
        Ok(MediaPrepared {
            upload_url: format!("/v1/media/{id}"),
            media_id: id,
            expires_in: self.cfg.media_upload_ttl_ms / 1000,
            chunk_size: self.cfg.media_chunk_bytes,
        })
    }

    fn live_media(&self, id: &MediaId, now: Millis) -> Result<MediaRecord, MediaError> {
        let rec = self.db.media(id)?.ok_or(MediaError::NotFound)?;
        if !rec.complete() && now >= rec.expires_at {
            return Err(MediaError::NotFound);
        }
        Ok(rec)
    }

    /// Appends `bytes` at `offset`; only the uploader may, and only at the byte the server
    /// has (so a broken upload resumes exactly where it stopped).
    pub fn media_put(
        &mut self,
        user: &UserId,
        id: &MediaId,
        offset: u64,
        bytes: &[u8],
        now: Millis,
    ) -> Result<MediaStatus, MediaError> {
        let mut rec = self.live_media(id, now)?;
        if &rec.owner != user {
            return Err(MediaError::Forbidden);
        }
        if bytes.len() > self.cfg.media_chunk_bytes {
            return Err(MediaError::TooLarge(format!(
                "chunk exceeds {} bytes",
                self.cfg.media_chunk_bytes
            )));
        }
        if offset != rec.received {
            return Err(MediaError::WrongOffset {
                received: rec.received,
            });
        }
        if bytes.is_empty() || offset + bytes.len() as u64 > rec.size {
            return Err(MediaError::BadRequest(
                "chunk is empty or runs past file_size".into(),
            ));
        }
        rec.received += bytes.len() as u64;
        self.db.commit(vec![
            Write::Put(
                Table::MediaChunks,
                media_chunk_key(id, offset),
                bytes.to_vec(),
            ),
            Write::Put(Table::Media, key(&[id.as_str()], None), enc(&rec)),
        ])?;
        self.log(|| super::CoreEvent::MediaChunk {
            at: now,
            media_id: id.clone(),
            conversation: rec.conversation_id.clone(),
            user: user.clone(),
            received: rec.received,
            size: rec.size,
        });
        Ok(MediaStatus {
            media_id: id.clone(),
            size: rec.size,
            received: rec.received,
            complete: rec.complete(),
        })
    }

    /// How much of an upload has arrived (uploader or conversation members).
    pub fn media_status(
        &self,
        user: &UserId,
        id: &MediaId,
        now: Millis,
    ) -> Result<MediaStatus, MediaError> {
        let rec = self.live_media(id, now)?;
        if &rec.owner != user {
            self.member_of(user, &rec.conversation_id)?;
        }
        Ok(MediaStatus {
            media_id: id.clone(),
            size: rec.size,
            received: rec.received,
            complete: rec.complete(),
        })
    }

    /// Opens a complete upload for download, for members of its conversation only:
    /// its type and size. The bytes are then read chunk by chunk with `media_read`, so a
    /// download never holds the whole file (up to 64 MiB) in memory or the core's lock.
    pub fn media_open(
        &mut self,
        user: &UserId,
        id: &MediaId,
        now: Millis,
    ) -> Result<(String, u64), MediaError> {
        let rec = self.live_media(id, now)?;
        self.member_of(user, &rec.conversation_id)?;
        if !rec.complete() {
            return Err(MediaError::Incomplete);
        }
        let size = if self.bugs.truncated_media {
            rec.size.saturating_sub(1)
        } else {
            rec.size
        };
        self.log(|| super::CoreEvent::MediaFetched {
            at: now,
            media_id: id.clone(),
            conversation: rec.conversation_id.clone(),
            user: user.clone(),
            bytes: size,
        });
        Ok((rec.file_type, size))
    }

    /// The stored chunk that starts at byte `offset` of an upload (chunks are contiguous:
    /// the next one starts where this one ends), or `None` if there is none.
    pub fn media_read(&self, id: &MediaId, offset: u64) -> Result<Option<Vec<u8>>, MediaError> {
        Ok(self.db.media_chunk(id, offset)?)
    }

    /// The whole file of a complete upload (`media_open` + every `media_read`).
    pub fn media_get(
        &mut self,
        user: &UserId,
        id: &MediaId,
        now: Millis,
    ) -> Result<(String, Vec<u8>), MediaError> {
        let (file_type, size) = self.media_open(user, id, now)?;
        let mut bytes = Vec::new();
        while (bytes.len() as u64) < size {
            match self.media_read(id, bytes.len() as u64)? {
                Some(chunk) => bytes.extend_from_slice(&chunk),
                None => break,
            }
        }
        bytes.truncate(size as usize);
        Ok((file_type, bytes))
    }

    /// A message may carry `media_id` only for a complete upload into the same conversation.
    pub(super) fn check_media_reference(
        &self,
        user: &UserId,
        id: &MediaId,
        conv: &ConversationId,
    ) -> Result<(), Reject> {
        let rec = self
            .db
            .media(id)?
            .ok_or_else(|| Reject::new(400, "unknown media_id"))?;
        if &rec.owner != user || &rec.conversation_id != conv {
            return Err(Reject::new(403, "media_id belongs to another upload"));
        }
        if !rec.complete() {
            return Err(Reject::new(409, "media upload is not complete"));
        }
        Ok(())
    }

    /// Deletes incomplete uploads past their expiry, and complete ones past retention.
    /// (It looks at the first `MEDIA_SWEEP_SCAN` uploads only: a store holding more live
    /// uploads than that sweeps the rest late. A known limit.)
    pub(super) fn sweep_media(&mut self, now: Millis) -> Result<(), Reject> {
        for rec in self.db.all_media(MEDIA_SWEEP_SCAN)? {
            let dead = (!rec.complete() && now >= rec.expires_at)
                || now.since(rec.created_at) >= self.cfg.retention_ms;
            if !dead {
                continue;
            }
            let mut batch = vec![Write::Delete(
                Table::Media,
                key(&[rec.media_id.as_str()], None),
            )];
            let prefix = key(&[rec.media_id.as_str()], None);
            for (k, _) in self
                .db
                .kv
                .scan(Table::MediaChunks, &prefix, &prefix, usize::MAX)?
            {
                batch.push(Write::Delete(Table::MediaChunks, k));
            }
            self.db.commit(batch)?;
        }
        Ok(())
    }
}
