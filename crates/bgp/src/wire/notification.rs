//! NOTIFICATION (RFC 4271 §4.5) with the codes of RFC 4271, 4486, 5492,
//! 6608, 7313, 8203/9003 and 8538, and decoded reasons for logs.

use std::fmt;

use super::Reader;

/// Error codes.
pub mod error_code {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH: u8 = 7;
}

/// Message Header Error subcodes.
pub mod header_error {
    pub const NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_LENGTH: u8 = 2;
    pub const BAD_TYPE: u8 = 3;
}

/// OPEN Message Error subcodes.
pub mod open_error {
    pub const UNSUPPORTED_VERSION: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_IDENTIFIER: u8 = 3;
    pub const UNSUPPORTED_OPTIONAL_PARAMETER: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const UNSUPPORTED_CAPABILITY: u8 = 7;
}

/// UPDATE Message Error subcodes.
pub mod update_error {
    pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const MISSING_WELL_KNOWN: u8 = 3;
    pub const ATTRIBUTE_FLAGS: u8 = 4;
    pub const ATTRIBUTE_LENGTH: u8 = 5;
    pub const INVALID_ORIGIN: u8 = 6;
    pub const INVALID_NEXT_HOP: u8 = 8;
    pub const OPTIONAL_ATTRIBUTE: u8 = 9;
    pub const INVALID_NETWORK_FIELD: u8 = 10;
    pub const MALFORMED_AS_PATH: u8 = 11;
}

/// Cease subcodes (RFC 4486, 8538).
pub mod cease {
    pub const MAX_PREFIXES: u8 = 1;
    pub const ADMIN_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMIN_RESET: u8 = 4;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const OTHER_CONFIG_CHANGE: u8 = 6;
    pub const COLLISION_RESOLUTION: u8 = 7;
    pub const OUT_OF_RESOURCES: u8 = 8;
    pub const HARD_RESET: u8 = 9;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: Vec<u8>) -> Self {
        Notification {
            code,
            subcode,
            data,
        }
    }

    /// A Cease with an RFC 9003 shutdown communication (UTF-8, at most 255
    /// bytes, cut at a character boundary).
    pub fn cease_with_message(subcode: u8, message: &str) -> Self {
        let mut end = message.len().min(255);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let mut data = Vec::with_capacity(end + 1);
        if end > 0 {
            data.push(end as u8);
            data.extend_from_slice(&message.as_bytes()[..end]);
        }
        Notification::new(error_code::CEASE, subcode, data)
    }

    pub(crate) fn update(subcode: u8, data: Vec<u8>) -> Self {
        Notification::new(error_code::UPDATE, subcode, data)
    }

    pub(crate) fn decode_body(body: &[u8]) -> Self {
        let mut r = Reader::new(body);
        let code = r.u8().unwrap_or(0);
        let subcode = r.u8().unwrap_or(0);
        Notification {
            code,
            subcode,
            data: r.rest().to_vec(),
        }
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(self.code);
        out.push(self.subcode);
        out.extend_from_slice(&self.data);
    }

    /// `"Cease / Administrative Shutdown"`.
    pub fn reason(&self) -> String {
        use error_code::*;
        let code = match self.code {
            HEADER => "Message Header Error",
            OPEN => "OPEN Message Error",
            UPDATE => "UPDATE Message Error",
            HOLD_TIMER_EXPIRED => "Hold Timer Expired",
            FSM => "Finite State Machine Error",
            CEASE => "Cease",
            ROUTE_REFRESH => "ROUTE-REFRESH Message Error",
            _ => return format!("error code {} / subcode {}", self.code, self.subcode),
        };
        let sub = match (self.code, self.subcode) {
            (_, 0) => None,
            (HEADER, 1) => Some("Connection Not Synchronized"),
            (HEADER, 2) => Some("Bad Message Length"),
            (HEADER, 3) => Some("Bad Message Type"),
            (OPEN, 1) => Some("Unsupported Version Number"),
            (OPEN, 2) => Some("Bad Peer AS"),
            (OPEN, 3) => Some("Bad BGP Identifier"),
            (OPEN, 4) => Some("Unsupported Optional Parameter"),
            (OPEN, 6) => Some("Unacceptable Hold Time"),
            (OPEN, 7) => Some("Unsupported Capability"),
            (OPEN, 11) => Some("Role Mismatch"),
            (UPDATE, 1) => Some("Malformed Attribute List"),
            (UPDATE, 2) => Some("Unrecognized Well-known Attribute"),
            (UPDATE, 3) => Some("Missing Well-known Attribute"),
            (UPDATE, 4) => Some("Attribute Flags Error"),
            (UPDATE, 5) => Some("Attribute Length Error"),
            (UPDATE, 6) => Some("Invalid ORIGIN Attribute"),
            (UPDATE, 8) => Some("Invalid NEXT_HOP Attribute"),
            (UPDATE, 9) => Some("Optional Attribute Error"),
            (UPDATE, 10) => Some("Invalid Network Field"),
            (UPDATE, 11) => Some("Malformed AS_PATH"),
            (FSM, 1) => Some("Unexpected Message in OpenSent State"),
            (FSM, 2) => Some("Unexpected Message in OpenConfirm State"),
            (FSM, 3) => Some("Unexpected Message in Established State"),
            (CEASE, 1) => Some("Maximum Number of Prefixes Reached"),
            (CEASE, 2) => Some("Administrative Shutdown"),
            (CEASE, 3) => Some("Peer De-configured"),
            (CEASE, 4) => Some("Administrative Reset"),
            (CEASE, 5) => Some("Connection Rejected"),
            (CEASE, 6) => Some("Other Configuration Change"),
            (CEASE, 7) => Some("Connection Collision Resolution"),
            (CEASE, 8) => Some("Out of Resources"),
            (CEASE, 9) => Some("Hard Reset"),
            (ROUTE_REFRESH, 1) => Some("Invalid Message Length"),
            _ => None,
        };
        match sub {
            Some(sub) => format!("{code} / {sub}"),
            None if self.subcode == 0 => code.to_string(),
            None => format!("{code} / subcode {}", self.subcode),
        }
    }

    /// The RFC 9003 shutdown communication of an Administrative Shutdown or
    /// Reset, when the data carries a valid one.
    pub fn shutdown_message(&self) -> Option<&str> {
        let shutdown_or_reset =
            self.subcode == cease::ADMIN_SHUTDOWN || self.subcode == cease::ADMIN_RESET;
        if self.code != error_code::CEASE || !shutdown_or_reset {
            return None;
        }
        let (len, text) = self.data.split_first()?;
        std::str::from_utf8(text.get(..*len as usize)?).ok()
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())?;
        if let Some(message) = self.shutdown_message() {
            write!(f, ": \"{message}\"")?;
        } else if !self.data.is_empty() {
            f.write_str(" (data")?;
            for b in self.data.iter().take(32) {
                write!(f, " {b:02x}")?;
            }
            if self.data.len() > 32 {
                write!(f, " … {} bytes", self.data.len())?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A NOTIFICATION is also what a decoding error is (the one the RFCs say
/// to send), so it travels as an error.
impl std::error::Error for Notification {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_like_the_rfc() {
        assert_eq!(
            Notification::new(6, 2, vec![]).reason(),
            "Cease / Administrative Shutdown"
        );
        assert_eq!(
            Notification::new(2, 2, vec![0xfd, 0xe8]).to_string(),
            "OPEN Message Error / Bad Peer AS (data fd e8)"
        );
        assert_eq!(
            Notification::new(4, 0, vec![]).to_string(),
            "Hold Timer Expired"
        );
        assert_eq!(
            Notification::new(42, 1, vec![]).reason(),
            "error code 42 / subcode 1"
        );
    }

    #[test]
    fn shutdown_communication_round_trips_and_is_cut_at_a_char_boundary() {
        let n = Notification::cease_with_message(cease::ADMIN_SHUTDOWN, "maintenance until 14:00");
        assert_eq!(n.shutdown_message(), Some("maintenance until 14:00"));
        assert_eq!(
            n.to_string(),
            "Cease / Administrative Shutdown: \"maintenance until 14:00\""
        );
        let long = "é".repeat(200);
        let n = Notification::cease_with_message(cease::ADMIN_SHUTDOWN, &long);
        assert!(n.data.len() <= 256);
        assert_eq!(n.shutdown_message().map(|m| m.chars().count()), Some(127));
        let empty = Notification::cease_with_message(cease::ADMIN_RESET, "");
        assert!(empty.data.is_empty());
    }
}
