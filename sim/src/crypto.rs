//! End-to-end encryption of simulated message bodies: ChaCha20-Poly1305 with a
//! per-conversation key that only the simulated clients derive. The server only ever sees
//! base64 ciphertext, and the oracle checks that no plaintext marker reaches it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

/// Every plaintext starts with this, so a leak is easy to find in server state.
pub const PLAINTEXT_MARKER: &str = "PLAINTEXT:";

fn key_for(run_key: u64, conversation: &str) -> Key {
    let mut h = Sha256::new();
    h.update(run_key.to_be_bytes());
    h.update(conversation.as_bytes());
    Key::clone_from_slice(&h.finalize())
}

fn nonce_for(sender: &str, cmid: &str) -> Nonce {
    let mut h = Sha256::new();
    h.update(sender.as_bytes());
    h.update([0]);
    h.update(cmid.as_bytes());
    Nonce::clone_from_slice(&h.finalize()[..12])
}

/// The body of message `cmid` from `sender`: marker, cmid, a little text.
pub fn plaintext(sender: &str, cmid: &str) -> String {
    format!("{PLAINTEXT_MARKER}{sender}:{cmid}:running late")
}

/// Encrypts `plaintext` for `conversation`; deterministic for a given (sender, cmid), so a
/// retry carries the same bytes.
pub fn seal(run_key: u64, conversation: &str, sender: &str, cmid: &str, plaintext: &str) -> String {
    let cipher = ChaCha20Poly1305::new(&key_for(run_key, conversation));
    let nonce = nonce_for(sender, cmid);
    // Encryption with a valid key and nonce cannot fail for in-memory buffers.
    let ct = cipher
        .encrypt(&nonce, plaintext.as_bytes())
        .unwrap_or_default();
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    STANDARD.encode(out)
}

/// Decrypts a body; `None` if it was tampered with or is for another conversation.
pub fn open(run_key: u64, conversation: &str, content: &str) -> Option<String> {
    let raw = STANDARD.decode(content).ok()?;
    if raw.len() < 12 {
        return None;
    }
    let (nonce, ct) = raw.split_at(12);
    let cipher = ChaCha20Poly1305::new(&key_for(run_key, conversation));
    let pt = cipher.decrypt(Nonce::from_slice(nonce), ct).ok()?;
    String::from_utf8(pt).ok()
}

/// The (sender, cmid) inside a plaintext made by `plaintext`.
pub fn parse_plaintext(pt: &str) -> Option<(String, String)> {
    let rest = pt.strip_prefix(PLAINTEXT_MARKER)?;
    let mut it = rest.splitn(3, ':');
    Some((it.next()?.to_string(), it.next()?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_body_opens_only_with_its_conversation_key() {
        let pt = plaintext("u0", "m1");
        let ct = seal(7, "dm:u0:u1", "u0", "m1", &pt);
        assert!(!ct.contains(PLAINTEXT_MARKER));
        assert_eq!(open(7, "dm:u0:u1", &ct).as_deref(), Some(pt.as_str()));
        assert_eq!(open(7, "dm:u0:u2", &ct), None);
        assert_eq!(open(8, "dm:u0:u1", &ct), None);
        assert_eq!(parse_plaintext(&pt), Some(("u0".into(), "m1".into())));
    }
}
