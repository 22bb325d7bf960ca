//! Session tokens: `<session id>.<256-bit secret>`, stored only as a SHA-256
//! hash of the secret, compared in constant time.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new secret: 32 random bytes from the OS-seeded thread RNG, as hex.
pub(crate) fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the store keeps: SHA-256 of the secret.
pub(crate) fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// The token a client presents: `<session id>.<secret>`.
pub(crate) fn token(session_id: &str, secret: &str) -> String {
    format!("{session_id}.{secret}")
}

/// Splits a token into session id and secret.
pub(crate) fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.rsplit_once('.')?;
    (!id.is_empty() && secret.len() == 64).then_some((id, secret))
}

/// Whether `secret` hashes to `stored`, in time independent of where they differ.
pub(crate) fn verify(secret: &str, stored: &[u8]) -> bool {
    let hash = hash_secret(secret);
    hash.len() == stored.len() && bool::from(hash.ct_eq(stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_verify() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_secret());
        let t = token("abc", &secret);
        let (id, s) = split_token(&t).unwrap();
        assert_eq!((id, s), ("abc", secret.as_str()));
        let stored = hash_secret(&secret);
        assert!(verify(s, &stored));
        assert!(!verify(&new_secret(), &stored));
        assert!(!verify(s, &stored[..31]));
        assert!(split_token("nodot").is_none());
        assert!(split_token("id.short").is_none());
    }
}
