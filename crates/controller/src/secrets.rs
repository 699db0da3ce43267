//! Random secrets and their stored form: a secret is shown once, the store
//! keeps its SHA-256.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::RngCore;

/// 32 random bytes, base64url: a bearer secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A short random identifier (16 hex digits).
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

pub fn hash(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets by their hashes, so the time taken says nothing about
/// how much of a guess matched.
pub fn same(a: &str, b: &str) -> bool {
    hash(a) == hash(b)
}
