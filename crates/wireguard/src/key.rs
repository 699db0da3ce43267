//! WireGuard keys: 32 bytes, written in base64 in configs and by `wg`, in
//! hex on the UAPI socket.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gotatun::x25519;

/// A Curve25519 key or a preshared key: 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

impl Key {
    /// A fresh private key from the operating system's random source,
    /// clamped as `wg genkey` writes it.
    pub fn generate_private() -> Key {
        let secret = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        Key(secret.to_bytes()).clamped()
    }

    /// This private key clamped for X25519 (RFC 7748 §5): the low three
    /// bits cleared, the top bit cleared and the next one set. The scalar
    /// multiplication clamps anyway, so the public key is the same; the
    /// kernel module and wireguard-go store and report a private key
    /// clamped, and so does the device.
    pub fn clamped(self) -> Key {
        let mut k = self.0;
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Key(k)
    }

    /// The public key of this private key.
    pub fn public_key(&self) -> Key {
        let secret = x25519::StaticSecret::from(self.0);
        Key(*x25519::PublicKey::from(&secret).as_bytes())
    }

    /// All zeros: on the UAPI, "no key".
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    /// Reads the 44-character base64 form (`wg genkey`).
    pub fn from_base64(text: &str) -> Result<Key, KeyError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError(format!("not a base64 key: {e}")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| KeyError(format!("a key is 32 bytes, this is {}", b.len())))?;
        Ok(Key(bytes))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Reads the 64-character hex form of the UAPI.
    pub fn from_hex(text: &str) -> Result<Key, KeyError> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return Err(KeyError(format!(
                "a hex key is 64 characters, this is {}",
                text.len()
            )));
        }
        let mut key = [0u8; 32];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(KeyError(format!("{:?} is not a hex digit", c as char))),
            };
            key[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(Key(key))
    }

    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(DIGITS[usize::from(b >> 4)] as char);
            out.push(DIGITS[usize::from(b & 15)] as char);
        }
        out
    }
}

impl FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Key, KeyError> {
        Key::from_base64(s)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Debug never prints key material: only the first characters of the
/// base64 form, enough to tell public keys apart in logs.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let key = Key::generate_private();
        assert_eq!(Key::from_base64(&key.to_base64()), Ok(key));
        assert_eq!(Key::from_hex(&key.to_hex()), Ok(key));
        assert_eq!(key.to_base64().len(), 44);
        assert_eq!(key.to_hex().len(), 64);
    }

    /// The public key of RFC 7748's test vector (Alice's key pair, §6.1).
    #[test]
    fn public_key_matches_rfc_7748() {
        let private =
            Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .expect("hex");
        assert_eq!(
            private.public_key().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    /// What the kernel's selftest checks (netns.sh): a key whose first
    /// base64 character is `/` comes back as `+` (the low bits cleared),
    /// with the same public key.
    #[test]
    fn clamping_follows_rfc_7748_and_keeps_the_public_key() {
        let key = Key([0xff; 32]);
        let clamped = key.clamped();
        assert_eq!(clamped.0[0], 0xf8);
        assert_eq!(clamped.0[31], 0x7f);
        assert_eq!(clamped.0[1..31], key.0[1..31]);
        assert_eq!(clamped.public_key(), key.public_key());
        assert_eq!(clamped.clamped(), clamped);
        let slash = Key::from_base64("/TOE4TKtAqVsePRVR+5AA43HkAK5DSntkOCO7nYq5xU=").expect("key");
        assert_eq!(
            slash.clamped().to_base64(),
            "+DOE4TKtAqVsePRVR+5AA43HkAK5DSntkOCO7nYq51U="
        );
        let fresh = Key::generate_private();
        assert_eq!(fresh, fresh.clamped());
    }

    #[test]
    fn bad_keys_say_why() {
        assert!(Key::from_base64("abc").is_err());
        assert!(
            Key::from_base64("AAAA")
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        assert!(Key::from_hex("zz").is_err());
        let bad = "g".repeat(64);
        assert!(
            Key::from_hex(&bad)
                .unwrap_err()
                .to_string()
                .contains("hex digit")
        );
    }
}
