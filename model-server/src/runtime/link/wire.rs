//! The internal link between a gateway node and the chat service: its messages and their
//! framing (a 4-byte big-endian length, then one JSON object). Documented in
//! docs/PROTOCOL.md, part 2. Both ends of the link import only this module's types, so
//! the two sides cannot drift apart.

use crate::ids::{ConnId, GatewayId, RegionId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version both ends must speak; a gateway of another version is refused at `hello`.
pub const LINK_VERSION: u32 = 1;

/// Largest link frame either end reads once the link is made; a longer length prefix ends
/// the link. Batches are split well below it (`BATCH_BYTES`), so only a single server
/// frame of more than 64 MiB (beyond every queue bound) could reach it.
pub const MAX_LINK_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Largest frame read before `hello`/`welcome` has been checked: an unauthenticated peer
/// cannot make either end allocate more.
pub const MAX_HELLO_BYTES: usize = 4096;

/// The chat service splits a connection's batch into `frames` messages of about this
/// many bytes at most (at least one frame each).
pub const BATCH_BYTES: usize = 1024 * 1024;

/// Gateway → chat service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToChat {
    /// First message of a link: who the gateway is, proven by `auth::link_proof` (an
    /// HMAC of the gateway id with the server secret).
    Hello {
        version: u32,
        gateway: GatewayId,
        region: RegionId,
        proof: String,
    },
    /// A client socket arrived: asks for a connection id (answered by `connected`).
    Connect { req: u64 },
    /// A text frame the client sent on `conn`, as received.
    Text { conn: ConnId, text: String },
    /// A binary frame arrived on `conn` (not part of the client protocol).
    Binary { conn: ConnId },
    /// The last `frames` batch for `conn` is written to the socket: send the next one.
    Written { conn: ConnId },
    /// The client socket of `conn` is gone.
    Gone { conn: ConnId },
    /// Keeps the link alive; answered by `pong`.
    Ping { n: u64 },
}

/// Chat service → gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToGateway {
    /// `hello` accepted: the largest client frame the gateway may read.
    Welcome {
        version: u32,
        max_transport_frame_bytes: usize,
    },
    /// `hello` refused (wrong version, bad token); the link closes after it.
    Refused { reason: String },
    /// Answer to `connect`: the id, or none when the chat service refuses the socket.
    Connected { req: u64, conn: Option<ConnId> },
    /// Frames to write to `conn`, in order. At most one batch per connection is
    /// unanswered: the next comes after the gateway's `written`.
    Frames { conn: ConnId, frames: Vec<String> },
    /// Write `final_frames`, then a close frame with `code` and `reason`, then close.
    Close {
        conn: ConnId,
        code: u16,
        reason: String,
        final_frames: Vec<String>,
    },
    /// Answer to `ping`.
    Pong { n: u64 },
}

/// Writes one framed message.
pub async fn write_msg<W, T>(w: &mut W, msg: &T) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_LINK_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link frame of {} bytes is over the limit", body.len()),
        ));
    }
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await
}

/// Reads one framed message of at most `max` bytes; `None` at a clean end of stream
/// between messages.
pub async fn read_msg<R, T>(r: &mut R, max: usize) -> io::Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link frame of {n} bytes announced; the limit is {max}"),
        ));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_survives_the_framing() {
        let msg = ToGateway::Frames {
            conn: ConnId(7),
            frames: vec!["{\"type\":\"message\"}".into(), "x".into()],
        };
        let mut buf = Vec::new();
        write_msg(&mut buf, &msg).await.expect("write");
        write_msg(&mut buf, &ToGateway::Pong { n: 3 })
            .await
            .expect("write");
        let mut r = buf.as_slice();
        let a: Option<ToGateway> = read_msg(&mut r, MAX_LINK_FRAME_BYTES).await.expect("read");
        let b: Option<ToGateway> = read_msg(&mut r, MAX_LINK_FRAME_BYTES).await.expect("read");
        let end: Option<ToGateway> = read_msg(&mut r, MAX_LINK_FRAME_BYTES).await.expect("read");
        assert_eq!(a, Some(msg));
        assert_eq!(b, Some(ToGateway::Pong { n: 3 }));
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn an_oversized_length_prefix_ends_the_link_without_allocating_it() {
        let mut buf = ((MAX_LINK_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let mut r = buf.as_slice();
        let e = read_msg::<_, ToChat>(&mut r, MAX_LINK_FRAME_BYTES)
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn before_hello_a_peer_may_announce_only_a_small_frame() {
        let mut buf = ((MAX_HELLO_BYTES + 1) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let mut r = buf.as_slice();
        assert!(read_msg::<_, ToChat>(&mut r, MAX_HELLO_BYTES)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn an_unknown_message_type_is_an_error_not_a_panic() {
        let body = br#"{"type":"drop_table"}"#;
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(body);
        let mut r = buf.as_slice();
        assert!(read_msg::<_, ToChat>(&mut r, MAX_LINK_FRAME_BYTES)
            .await
            .is_err());
    }
}
