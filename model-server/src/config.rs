//! Every bound and timing rule of the model in one place, with its default and where the
//! figure comes from (TigerBeetle style: nothing is unbounded).

use serde::{Deserialize, Serialize};

/// Limits and timings of one chat server. Every queue, frame, page, group and rate has a
/// named bound here; the core never allocates past them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest text frame the core accepts, in bytes; larger gets error 413.
    pub max_frame_bytes: usize,
    /// Largest frame the WebSocket layer reads at all; past it the socket is closed (1009).
    pub max_transport_frame_bytes: usize,
    /// Largest `content` (opaque ciphertext) of one message, in bytes. Seed 001: ~1 KB
    /// average message with metadata; 16 KiB leaves room for long texts.
    pub max_content_bytes: usize,
    /// Outbound queue bound per connection, in frames.
    pub outbound_max_frames: usize,
    /// Outbound queue bound per connection, in bytes.
    pub outbound_max_bytes: usize,
    /// Most messages in one `sync_page`, whatever the client asks (seed 002: limit is capped
    /// server-side).
    pub sync_page_cap: usize,
    /// Most inbox rows one pending `sync` page scans before it answers (copies this device
    /// already acked are skipped but counted), so one request's cost is bounded however
    /// large the inbox; the page then says `has_more` and the client continues.
    pub sync_scan_rows: usize,
    /// Group size cap (seed 003: 256 members).
    pub group_cap: usize,
    /// Groups up to this size are copied into every member's inbox on send; larger groups
    /// keep one shared log read by cursor (seed 002: copy-on-send vs shared log).
    pub group_fanout_threshold: usize,
    /// Sustained sends per second allowed per user.
    pub send_rate_per_sec: u32,
    /// Burst of sends allowed per user above the sustained rate.
    pub send_burst: u32,
    /// Client heartbeat interval the server expects (seed 000: every 30 s).
    pub heartbeat_interval_ms: u64,
    /// A device with no frame for this long is offline and its socket closed (seed 000: 60 s).
    pub presence_timeout_ms: u64,
    /// A connection that has not authenticated after this long is closed.
    pub auth_timeout_ms: u64,
    /// Least time between two typing notices from one user in one conversation.
    pub typing_min_interval_ms: u64,
    /// Undelivered messages expire after this long (seed 000: 30 days).
    pub retention_ms: u64,
    /// How often the server sweeps messages and uploads past their lifetime.
    pub sweep_interval_ms: u64,
    /// Most expired messages one sweep step deletes (bounded work per tick); a full batch
    /// is followed by another on the next tick until the sweep has caught up.
    pub sweep_batch: usize,
    /// Keep message bodies after every device acked them (server-side history) for all users.
    pub keep_history: bool,
    /// Most presence subscriptions one connection may hold.
    pub max_presence_subscriptions: usize,
    /// Most message ids in one read receipt.
    pub max_receipt_ids: usize,
    /// Largest media object, in bytes.
    pub max_media_bytes: u64,
    /// Largest chunk of one media upload request, in bytes.
    pub media_chunk_bytes: usize,
    /// An upload not completed within this long is deleted (seed 002: expire broken uploads).
    pub media_upload_ttl_ms: u64,
    /// Lifetime of minted auth tokens by default.
    pub token_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_transport_frame_bytes: 1024 * 1024,
            max_content_bytes: 16 * 1024,
            outbound_max_frames: 1024,
            outbound_max_bytes: 1024 * 1024,
            sync_page_cap: 200,
            sync_scan_rows: 4096,
            group_cap: 256,
            group_fanout_threshold: 100,
            send_rate_per_sec: 20,
            send_burst: 100,
            heartbeat_interval_ms: 30_000,
            presence_timeout_ms: 60_000,
            auth_timeout_ms: 5_000,
            typing_min_interval_ms: 2_000,
            retention_ms: 30 * 24 * 3600 * 1000,
            sweep_interval_ms: 60_000,
            sweep_batch: 1024,
            keep_history: false,
            max_presence_subscriptions: 1024,
            max_receipt_ids: 256,
            max_media_bytes: 64 * 1024 * 1024,
            media_chunk_bytes: 256 * 1024,
            media_upload_ttl_ms: 24 * 3600 * 1000,
            token_ttl_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// Planted bugs: deliberate design mistakes the simulator must catch (`--bug NAME`).
///
/// All are off by default and cost one branch when off. The core implements the ones that
/// are server logic; the simulator's storage model implements `ack_before_persist` and
/// `async_replication_failover`, which are durability settings of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bugs {
    /// The store acknowledges writes before they are durable (a crash loses acked messages).
    pub ack_before_persist: bool,
    /// Retries are not deduplicated: a retry is stored again with a new seq.
    pub no_dedup: bool,
    /// Messages are numbered by the sender's clock instead of the conversation counter.
    pub order_by_client_clock: bool,
    /// Outbound queues have no bound: a slow reader grows server memory without limit.
    pub unbounded_outbound_queue: bool,
    /// `sync` of pending messages answers with an empty page.
    pub skip_sync_on_reconnect: bool,
    /// Push notifications carry the message content.
    pub push_with_content: bool,
    /// Cross-region replication is asynchronous: failover loses the replication lag.
    pub async_replication_failover: bool,
    /// The media lane serves a file without its last byte.
    #[serde(default)]
    pub truncated_media: bool,
    /// The sender gets ✓✓ (delivered) as soon as the message is stored, before any
    /// recipient device has it.
    #[serde(default)]
    pub early_delivery_receipt: bool,
    /// `delivery_ack`s of inbox copies are ignored: copies are never cleared and every
    /// sync sends them again.
    #[serde(default)]
    pub forget_delivery_acks: bool,
    /// Group sends fan out to the member list cached at the group's first send, so members
    /// added later get nothing and removed ones keep receiving.
    #[serde(default)]
    pub stale_group_members: bool,
    /// A message's inbox copies are written in a second commit after the message itself:
    /// when that commit fails, the retry is deduplicated against a message no inbox holds.
    #[serde(default)]
    pub inbox_outside_commit: bool,
    /// The chat service logs each stored message's content at debug level (a debugging
    /// aid left on: the server sees only ciphertext, but its log must not carry content).
    #[serde(default)]
    pub log_content: bool,
    /// The server lets in a token that has expired (the expiry check is skipped).
    #[serde(default)]
    pub accept_expired_tokens: bool,
    /// Unlinking a device does not revoke its tokens: an old token logs it in (and
    /// registers it) again.
    #[serde(default)]
    pub unlinked_tokens_work: bool,
    /// Unlinking a device leaves the inbox copies that waited for it: their bodies stay
    /// until retention.
    #[serde(default)]
    pub unlink_keeps_copies: bool,
    /// `typing` notices also go to the typist's own devices (a filter written the wrong
    /// way round).
    #[serde(default)]
    pub typing_to_own_devices: bool,
    /// No inbox copy for a recipient whose every device is connected: the message goes
    /// only to their live connections (an "optimisation" that trusts the registry; a
    /// connection that is already dead, say behind a gateway cut off from the chat
    /// service, loses it for good).
    #[serde(default)]
    pub no_inbox_when_online: bool,
}

impl Bugs {
    /// Every bug name, as given to `--bug`.
    pub const NAMES: [&'static str; 18] = [
        "ack-before-persist",
        "no-dedup",
        "order-by-client-clock",
        "unbounded-outbound-queue",
        "skip-sync-on-reconnect",
        "push-with-content",
        "async-replication-failover",
        "truncated-media",
        "early-delivery-receipt",
        "forget-delivery-acks",
        "stale-group-members",
        "inbox-outside-commit",
        "log-content",
        "accept-expired-tokens",
        "unlinked-tokens-work",
        "unlink-keeps-copies",
        "typing-to-own-devices",
        "no-inbox-when-online",
    ];

    /// Switches on the bug called `name`.
    pub fn enable(&mut self, name: &str) -> Result<(), String> {
        let flag = match name {
            "ack-before-persist" => &mut self.ack_before_persist,
            "no-dedup" => &mut self.no_dedup,
            "order-by-client-clock" => &mut self.order_by_client_clock,
            "unbounded-outbound-queue" => &mut self.unbounded_outbound_queue,
            "skip-sync-on-reconnect" => &mut self.skip_sync_on_reconnect,
            "push-with-content" => &mut self.push_with_content,
            "async-replication-failover" => &mut self.async_replication_failover,
            "truncated-media" => &mut self.truncated_media,
            "early-delivery-receipt" => &mut self.early_delivery_receipt,
            "forget-delivery-acks" => &mut self.forget_delivery_acks,
            "stale-group-members" => &mut self.stale_group_members,
            "inbox-outside-commit" => &mut self.inbox_outside_commit,
            "log-content" => &mut self.log_content,
            "accept-expired-tokens" => &mut self.accept_expired_tokens,
            "unlinked-tokens-work" => &mut self.unlinked_tokens_work,
            "unlink-keeps-copies" => &mut self.unlink_keeps_copies,
            "typing-to-own-devices" => &mut self.typing_to_own_devices,
            "no-inbox-when-online" => &mut self.no_inbox_when_online,
            other => {
                return Err(format!(
                    "unknown bug '{other}'; known: {}",
                    Self::NAMES.join(", ")
                ))
            }
        };
        *flag = true;
        Ok(())
    }

    /// Names of the bugs switched on.
    pub fn enabled(&self) -> Vec<&'static str> {
        let flags = [
            self.ack_before_persist,
            self.no_dedup,
            self.order_by_client_clock,
            self.unbounded_outbound_queue,
            self.skip_sync_on_reconnect,
            self.push_with_content,
            self.async_replication_failover,
            self.truncated_media,
            self.early_delivery_receipt,
            self.forget_delivery_acks,
            self.stale_group_members,
            self.inbox_outside_commit,
            self.log_content,
            self.accept_expired_tokens,
            self.unlinked_tokens_work,
            self.unlink_keeps_copies,
            self.typing_to_own_devices,
            self.no_inbox_when_online,
        ];
        Self::NAMES
            .iter()
            .zip(flags)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect()
    }
}
