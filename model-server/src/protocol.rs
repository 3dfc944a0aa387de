//! The wire protocol: JSON text frames over WebSocket, as documented in docs/PROTOCOL.md.
//!
//! Frame names and fields follow seed 001 (`auth`, `message`, `message_ack`, ...), extended
//! with `conversation_id` and `seq` where ordering needs them. This module only converts
//! between bytes and typed frames; what a frame means lives in `core`.

use crate::ids::{ClientMsgId, ConversationId, GroupId, MediaId, MessageId, Seq, UserId};
use serde::{Deserialize, Serialize};

/// A frame sent by a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame on every connection.
    Auth { payload: AuthPayload },
    /// Send a 1:1 message.
    Message {
        client_message_id: ClientMsgId,
        payload: SendPayload,
    },
    /// Send to a group.
    GroupMessage {
        client_message_id: ClientMsgId,
        payload: GroupSendPayload,
    },
    /// This device has the message (one grey tick becomes two for the sender).
    DeliveryAck {
        message_id: MessageId,
        #[serde(default)]
        timestamp: Option<u64>,
    },
    /// The user has seen these messages (blue ticks for the sender).
    ReadReceipt {
        message_ids: Vec<MessageId>,
        #[serde(default)]
        timestamp: Option<u64>,
    },
    /// Ask for the current status of messages this user sent (after a reconnect, for the
    /// ones whose receipts may have been lost with the old socket).
    StatusQuery { message_ids: Vec<MessageId> },
    /// Keep-alive; also refreshes presence.
    Heartbeat {
        #[serde(default)]
        timestamp: Option<u64>,
    },
    /// Ask for stored messages after a position.
    Sync { payload: SyncPayload },
    /// Create a group; the creator is its first admin.
    GroupCreate { payload: GroupCreatePayload },
    /// Add members (admins only).
    GroupAdd { payload: GroupMembersPayload },
    /// Remove members (admins only; anyone may remove themselves).
    GroupRemove { payload: GroupMembersPayload },
    /// Follow the presence of these users.
    PresenceSubscribe { payload: PresenceSubscribePayload },
    /// "typing..." in a conversation.
    Typing { payload: TypingPayload },
    /// Change this user's settings.
    Settings { payload: SettingsPayload },
    /// Prepare a media upload over the socket (same as `POST /v1/media:prepare`).
    MediaPrepare { payload: MediaPreparePayload },
    /// Remove one of this user's devices (itself or another): it is logged out, its
    /// tokens stop working and nothing more waits for it.
    DeviceUnlink { payload: DeviceUnlinkPayload },
}

/// `device_unlink.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceUnlinkPayload {
    pub device_id: crate::ids::DeviceId,
}

/// `auth.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthPayload {
    pub user_id: UserId,
    pub auth_token: String,
    pub device_id: crate::ids::DeviceId,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub app_version: Option<String>,
    /// Token from a previous disconnect for slowness; echoed back as `resumed: true`.
    #[serde(default)]
    pub resume_token: Option<String>,
}

/// `message.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendPayload {
    pub receiver_id: UserId,
    /// Opaque ciphertext (base64). Never parsed, never logged.
    pub content: String,
    #[serde(default)]
    pub media_id: Option<MediaId>,
    #[serde(default)]
    pub reply_to: Option<MessageId>,
    /// The sender's clock; carried for display only, never used for ordering.
    #[serde(default)]
    pub timestamp: Option<u64>,
}

/// `group_message.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSendPayload {
    pub group_id: GroupId,
    pub content: String,
    #[serde(default)]
    pub media_id: Option<MediaId>,
    #[serde(default)]
    pub reply_to: Option<MessageId>,
    #[serde(default)]
    pub timestamp: Option<u64>,
}

/// `sync.payload`: one conversation after `after_seq`, or every pending message after
/// `cursor` when `conversation_id` is absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncPayload {
    #[serde(default)]
    pub conversation_id: Option<ConversationId>,
    #[serde(default)]
    pub after_seq: Option<Seq>,
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `group_create.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupCreatePayload {
    #[serde(default)]
    pub name: Option<String>,
    pub members: Vec<UserId>,
    #[serde(default)]
    pub announcement_only: bool,
}

/// `group_add.payload` / `group_remove.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupMembersPayload {
    pub group_id: GroupId,
    pub user_ids: Vec<UserId>,
}

/// `presence_subscribe.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceSubscribePayload {
    pub user_ids: Vec<UserId>,
}

/// `typing.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypingPayload {
    pub conversation_id: ConversationId,
}

/// `settings.payload`: fields left out are unchanged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SettingsPayload {
    #[serde(default)]
    pub hide_last_seen: Option<bool>,
    #[serde(default)]
    pub keep_history: Option<bool>,
}

/// `media_prepare.payload` and the body of `POST /v1/media:prepare`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MediaPreparePayload {
    pub conversation_id: ConversationId,
    pub file_type: String,
    pub file_size: u64,
}

/// A frame sent by the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    AuthSuccess {
        payload: AuthSuccessPayload,
    },
    MessageAck {
        client_message_id: ClientMsgId,
        payload: MessageAckPayload,
    },
    /// A 1:1 message delivered to a device (the recipient's, or the sender's other ones).
    Message {
        payload: DeliveredMessage,
    },
    /// A group message delivered to a member's device.
    GroupMessage {
        payload: DeliveredMessage,
    },
    /// To the sender: these messages reached a device of the recipient.
    DeliveryAck {
        payload: ReceiptPayload,
    },
    /// To the sender: the recipient has read these messages.
    ReadReceipt {
        payload: ReceiptPayload,
    },
    /// To a group sender: aggregated delivered/read counts for one message.
    GroupReceipt {
        payload: GroupReceiptPayload,
    },
    HeartbeatAck {
        server_time: u64,
    },
    SyncPage {
        payload: SyncPagePayload,
    },
    GroupCreated {
        payload: GroupInfo,
    },
    /// Group membership changed (to every member, old and new).
    GroupUpdate {
        payload: GroupInfo,
    },
    Presence {
        payload: PresencePayload,
    },
    Typing {
        payload: TypingNotice,
    },
    SettingsAck {
        payload: SettingsState,
    },
    MediaPrepared {
        payload: MediaPrepared,
    },
    /// Answer to `device_unlink`: the device is removed, durably.
    DeviceUnlinked {
        payload: DeviceUnlinkPayload,
    },
    Error {
        payload: ErrorPayload,
    },
}

/// `auth_success.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthSuccessPayload {
    pub session_id: String,
    pub server_time: u64,
    /// Messages waiting for this device (a `sync` without `conversation_id` fetches them).
    pub unread_count: u64,
    /// True when the client presented a valid resume token.
    pub resumed: bool,
    /// Heartbeat interval the server expects, in ms.
    pub heartbeat_interval_ms: u64,
}

/// `message_ack.payload`: the message is stored in the inbox; safe to show one tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageAckPayload {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub status: Status,
    pub timestamp: u64,
}

/// A stored message as a device receives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeliveredMessage {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub sender_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver_id: Option<UserId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<GroupId>,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_id: Option<MediaId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    /// Server time the message was stored.
    pub timestamp: u64,
    /// The sender's clock at send time, for display only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_timestamp: Option<u64>,
}

/// Delivery status as the sender sees it; only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Stored in the inbox (one tick).
    #[default]
    Sent,
    /// Reached a recipient device (two ticks).
    Delivered,
    /// Seen by the recipient (blue ticks).
    Read,
}

/// `delivery_ack.payload` / `read_receipt.payload` from server to sender.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReceiptPayload {
    pub conversation_id: ConversationId,
    pub message_ids: Vec<MessageId>,
    pub status: Status,
    /// Who delivered or read it.
    pub by: UserId,
    pub timestamp: u64,
}

/// `group_receipt.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupReceiptPayload {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    /// Members other than the sender.
    pub recipients: u64,
    pub delivered: u64,
    pub read: u64,
}

/// `sync_page.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncPagePayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    pub messages: Vec<DeliveredMessage>,
    /// Pass back as `cursor` (or the last `seq` as `after_seq`) for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    pub has_more: bool,
}

/// `group_created.payload` / `group_update.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub group_id: GroupId,
    pub conversation_id: ConversationId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub members: Vec<UserId>,
    pub admins: Vec<UserId>,
    pub announcement_only: bool,
}

/// Online or offline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    Online,
    Offline,
}

/// `presence.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresencePayload {
    pub user_id: UserId,
    pub status: PresenceStatus,
    /// Absent when the user hides it, or was never seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

/// `typing.payload` from the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypingNotice {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
}

/// `settings_ack.payload`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SettingsState {
    pub hide_last_seen: bool,
    pub keep_history: bool,
}

/// `media_prepared.payload` and the body answering `POST /v1/media:prepare`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MediaPrepared {
    pub media_id: MediaId,
    /// Relative URL on the same server; `PUT` chunks to it.
    pub upload_url: String,
    pub expires_in: u64,
    pub chunk_size: usize,
}

/// `error.payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorPayload {
    pub code: u16,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<ClientMsgId>,
    /// For 409: the id the first send got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    /// For 429: when to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// For a disconnect of a slow reader: present it in the next `auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
}

impl ErrorPayload {
    /// An error with only a code and a message.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        ErrorPayload {
            code,
            message: message.into(),
            client_message_id: None,
            message_id: None,
            conversation_id: None,
            seq: None,
            retry_after_ms: None,
            resume_token: None,
        }
    }
}

/// Why a frame could not be decoded; carries nothing of the frame's content.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("malformed JSON at line {line} column {column}")]
    Malformed { line: usize, column: usize },
    #[error("{0}")]
    Shape(String),
}

/// Decodes one client text frame.
///
/// Error messages never echo values from the frame (which could be message content), only
/// field and frame-type names and positions.
pub fn decode_client(text: &str) -> Result<ClientFrame, DecodeError> {
    serde_json::from_str(text).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => DecodeError::Malformed {
                line: e.line(),
                column: e.column(),
            },
            Category::Data => {
                let msg = e.to_string();
                let safe = msg.starts_with("missing field")
                    || msg.starts_with("unknown variant")
                    || msg.starts_with("missing field `type`");
                if safe {
                    DecodeError::Shape(msg)
                } else {
                    DecodeError::Shape(format!(
                        "a field has the wrong type or value (line {} column {})",
                        e.line(),
                        e.column()
                    ))
                }
            }
        }
    })
}

/// Encodes a server frame. Serializing these types cannot fail (no maps with non-string
/// keys, no custom serializers), so a failure is a bug worth a panic in tests.
pub fn encode_server(frame: &ServerFrame) -> String {
    match serde_json::to_string(frame) {
        Ok(s) => s,
        Err(e) => {
            debug_assert!(false, "server frame failed to encode: {e}");
            String::from(r#"{"type":"error","payload":{"code":500,"message":"encode failed"}}"#)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_001_send_frame_decodes() {
        let f = decode_client(
            r#"{"type":"message","client_message_id":"client_abc123","payload":{
                "receiver_id":"456","content":"SGV5","media_url":null,"reply_to":null,
                "timestamp":1699189200000}}"#,
        )
        .expect("decodes");
        match f {
            ClientFrame::Message {
                client_message_id,
                payload,
            } => {
                assert_eq!(client_message_id.as_str(), "client_abc123");
                assert_eq!(payload.receiver_id.as_str(), "456");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn decode_errors_never_echo_field_values() {
        let e = decode_client(r#"{"type":"delivery_ack","message_id":["secret-text"]}"#)
            .expect_err("wrong type");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = decode_client(r#"{"type":"nope"}"#).expect_err("unknown");
        assert!(e.to_string().contains("unknown variant"), "{e}");
        let e = decode_client("{not json").expect_err("malformed");
        assert!(matches!(e, DecodeError::Malformed { .. }));
    }

    #[test]
    fn server_frames_use_seed_names() {
        let s = encode_server(&ServerFrame::HeartbeatAck { server_time: 5 });
        assert_eq!(s, r#"{"type":"heartbeat_ack","server_time":5}"#);
    }
}
