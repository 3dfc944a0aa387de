//! Auth tokens: HMAC-SHA256 over (user, device, expiry) with a server secret.
//!
//! A token is `v1.<user>.<device>.<expiry_ms>.<signature>`, the signature being
//! base64url(HMAC-SHA256(secret, "v1.<user>.<device>.<expiry_ms>")). Ids may not contain
//! `.` (see `ids::is_valid_id`), so the body splits one way only and a token for one
//! (user, device) can never be read as another. Verification is constant time
//! (`Mac::verify_slice`).

use crate::ids::{is_valid_id, DeviceId, Millis, UserId};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Why a token was refused. Deliberately coarse: the client learns only that it failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token was issued for another user or device")]
    WrongIdentity,
    #[error("secret must be at least {MIN_SECRET_LEN} bytes")]
    WeakSecret,
}

/// The server secret, checked for length once.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Wraps raw secret bytes; refuses short secrets.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, AuthError> {
        let b = bytes.into();
        if b.len() < MIN_SECRET_LEN {
            return Err(AuthError::WeakSecret);
        }
        Ok(Secret(b))
    }

    /// The raw secret bytes (for other MACs keyed by the same secret).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, body: &str) -> HmacSha256 {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(body.as_bytes());
        mac
    }
}

/// Mints a token for `user`'s `device`, valid until `expires`.
pub fn mint(secret: &Secret, user: &UserId, device: &DeviceId, expires: Millis) -> String {
    let body = format!("v1.{user}.{device}.{}", expires.0);
    let sig = secret.mac(&body).finalize().into_bytes();
    format!("{body}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// The (user, device) a token claims, unverified; pass them to `verify` before trusting.
pub fn claims(token: &str) -> Option<(UserId, DeviceId)> {
    let rest = token.strip_prefix("v1.")?;
    let mut parts = rest.split('.');
    let user = parts.next()?;
    let device = parts.next()?;
    Some((UserId(user.to_owned()), DeviceId(device.to_owned())))
}

/// Checks `token` against the identity the client claims and the current time.
pub fn verify(
    secret: &Secret,
    token: &str,
    user: &UserId,
    device: &DeviceId,
    now: Millis,
) -> Result<(), AuthError> {
    if token.len() > 512 {
        return Err(AuthError::Malformed);
    }
    let (body, sig_b64) = token.rsplit_once('.').ok_or(AuthError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| AuthError::Malformed)?;
    secret
        .mac(body)
        .verify_slice(&sig)
        .map_err(|_| AuthError::BadSignature)?;
    // The signature is good, so the body is one we minted; now read the claims from it.
    let rest = body.strip_prefix("v1.").ok_or(AuthError::Malformed)?;
    let (ids, expiry) = rest.rsplit_once('.').ok_or(AuthError::Malformed)?;
    let expiry: u64 = expiry.parse().map_err(|_| AuthError::Malformed)?;
    let expected = format!("{user}.{device}");
    if !is_valid_id(user.as_str()) || !is_valid_id(device.as_str()) || ids != expected {
        return Err(AuthError::WrongIdentity);
    }
    if now.0 >= expiry {
        return Err(AuthError::Expired);
    }
    Ok(())
}

/// The proof a gateway node presents on its link to the chat service: an HMAC with the
/// server secret over `link1.<gateway>`. Its own domain (`link1.`, never `v1.`), so a link
/// proof is no client token and no client token is a link proof.
pub fn link_proof(secret: &Secret, gateway: &str) -> String {
    let sig = secret
        .mac(&format!("link1.{gateway}"))
        .finalize()
        .into_bytes();
    URL_SAFE_NO_PAD.encode(sig)
}

/// Checks a gateway's link proof (constant time).
pub fn verify_link_proof(secret: &Secret, gateway: &str, proof: &str) -> Result<(), AuthError> {
    if proof.len() > 128 || !is_valid_id(gateway) {
        return Err(AuthError::Malformed);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(proof)
        .map_err(|_| AuthError::Malformed)?;
    secret
        .mac(&format!("link1.{gateway}"))
        .verify_slice(&sig)
        .map_err(|_| AuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef0123".to_vec()).expect("long enough")
    }

    #[test]
    fn minted_token_verifies_for_its_identity_only() {
        let s = secret();
        let t = mint(&s, &"alice".into(), &"phone".into(), Millis(1_000));
        assert_eq!(
            verify(&s, &t, &"alice".into(), &"phone".into(), Millis(10)),
            Ok(())
        );
        assert_eq!(
            verify(&s, &t, &"bob".into(), &"phone".into(), Millis(10)),
            Err(AuthError::WrongIdentity)
        );
        assert_eq!(
            verify(&s, &t, &"alice".into(), &"laptop".into(), Millis(10)),
            Err(AuthError::WrongIdentity)
        );
    }

    #[test]
    fn expired_or_tampered_tokens_are_refused() {
        let s = secret();
        let t = mint(&s, &"alice".into(), &"phone".into(), Millis(1_000));
        assert_eq!(
            verify(&s, &t, &"alice".into(), &"phone".into(), Millis(1_000)),
            Err(AuthError::Expired)
        );
        let forged = t.replace("alice", "mallory");
        assert_eq!(
            verify(&s, &forged, &"mallory".into(), &"phone".into(), Millis(1)),
            Err(AuthError::BadSignature)
        );
        let other = Secret::new(b"another-secret-of-20".to_vec()).expect("ok");
        assert_eq!(
            verify(&other, &t, &"alice".into(), &"phone".into(), Millis(1)),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&s, "garbage", &"alice".into(), &"phone".into(), Millis(1)),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn a_link_proof_names_one_gateway_and_is_no_client_token() {
        let s = secret();
        let p = link_proof(&s, "gw-1");
        assert_eq!(verify_link_proof(&s, "gw-1", &p), Ok(()));
        assert_eq!(
            verify_link_proof(&s, "gw-2", &p),
            Err(AuthError::BadSignature)
        );
        let other = Secret::new(b"another-secret-of-20".to_vec()).expect("ok");
        assert_eq!(
            verify_link_proof(&other, "gw-1", &p),
            Err(AuthError::BadSignature)
        );
        let client = mint(&s, &"gw-1".into(), &"gw-1".into(), Millis(1_000));
        assert!(verify_link_proof(&s, "gw-1", &client).is_err());
    }

    #[test]
    fn dotted_ids_are_refused_so_tokens_split_one_way() {
        let s = secret();
        let t = mint(&s, &"a.b".into(), &"c".into(), Millis(1_000));
        assert_eq!(
            verify(&s, &t, &"a".into(), &"b.c".into(), Millis(1)),
            Err(AuthError::WrongIdentity)
        );
        assert_eq!(
            verify(&s, &t, &"a.b".into(), &"c".into(), Millis(1)),
            Err(AuthError::WrongIdentity)
        );
    }
}
