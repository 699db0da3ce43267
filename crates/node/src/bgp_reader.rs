//! The reading half of a BGP connection, between the socket and the BGP
//! task: it cuts the byte stream into whole messages and, once the session
//! has negotiated its codec, decodes them. The reader runs on a tokio
//! worker, so a full table is parsed on the second core while the BGP task
//! (one at a time, in order) works on the RIB.
//!
//! Before the codec is known (OPEN, KEEPALIVE), whole messages go to the
//! session undecoded and it checks and decodes them itself. Only the
//! header's length field is read here; everything else the session or the
//! codec checks, and a stream whose length field cannot be right goes to
//! the session as it came, which answers it with a NOTIFICATION.

use bgp4mesh_bgp::wire::{Codec, Decoded, Notification, decode_message, next_frame};

/// Bytes read at a time. Decoded, a read of a full table takes about six
/// times its size until the speaker is through with it: 32 KiB reads keep
/// that small and still come to 300 UPDATEs a read.
pub const READ_SIZE: usize = 32 * 1024;

/// What one read gives the BGP task.
#[derive(Debug)]
pub enum Received {
    /// Whole messages as they came (or, after a header that cannot be
    /// framed, the rest of the stream): for [`Speaker::received`].
    ///
    /// [`Speaker::received`]: bgp4mesh_bgp::speaker::Speaker::received
    Bytes(Vec<u8>),
    /// Decoded messages, in order; an error is the last one. For
    /// [`Speaker::received_decoded`].
    ///
    /// [`Speaker::received_decoded`]: bgp4mesh_bgp::speaker::Speaker::received_decoded
    Messages(Vec<Result<Decoded, Notification>>),
}

/// One connection's incoming byte stream, cut into messages.
#[derive(Debug, Default)]
pub struct MessageReader {
    /// Read and not yet passed on: at most part of one message between
    /// calls to [`MessageReader::take`].
    buf: Vec<u8>,
    /// A length field shorter than a header was seen: from there on the
    /// stream is not cut here any more.
    unframed: bool,
    /// A message failed to decode: the session closes the connection and
    /// nothing after it is passed on.
    failed: bool,
}

impl MessageReader {
    /// Room for one read, after what is buffered; then say how much of it
    /// was filled with [`MessageReader::filled`].
    pub fn space(&mut self) -> &mut [u8] {
        let start = self.buf.len();
        self.buf.resize(start + READ_SIZE, 0);
        &mut self.buf[start..]
    }

    /// `n` bytes of the last [`MessageReader::space`] were read.
    pub fn filled(&mut self, n: usize) {
        let end = self.buf.len() - READ_SIZE + n.min(READ_SIZE);
        self.buf.truncate(end);
    }

    /// The whole messages in the buffer: decoded with `codec` when the
    /// session has negotiated one, else as bytes. None: nothing whole yet.
    pub fn take(&mut self, codec: Option<&Codec>) -> Option<Received> {
        if self.failed {
            self.buf.clear();
            return None;
        }
        if self.unframed {
            return (!self.buf.is_empty()).then(|| Received::Bytes(std::mem::take(&mut self.buf)));
        }
        let mut end = 0;
        let mut messages = Vec::new();
        while end < self.buf.len() {
            // Every header check as soon as the header is in, so a bad one
            // is answered at once, not when its claimed length has come.
            let message = match next_frame(&self.buf[end..], codec.unwrap_or(&Codec::INITIAL)) {
                Ok(None) => break,
                Ok(Some((_, len))) => {
                    end += len;
                    match codec {
                        Some(codec) => decode_message(&self.buf[end - len..end], codec),
                        None => continue,
                    }
                }
                // Before the codec: wrong for 4096-byte messages. The
                // session, which may have the codec by now (an extended
                // UPDATE right behind the OPEN), frames the rest itself
                // and answers a bad header at once, as it always did.
                Err(_) if codec.is_none() => {
                    self.unframed = true;
                    return Some(Received::Bytes(std::mem::take(&mut self.buf)));
                }
                Err(n) => Err(n),
            };
            let failed = message.is_err();
            messages.push(message);
            if failed {
                self.failed = true;
                self.buf.clear();
                return Some(Received::Messages(messages));
            }
        }
        if end == 0 {
            return None;
        }
        if codec.is_none() {
            let rest = self.buf.split_off(end);
            return Some(Received::Bytes(std::mem::replace(&mut self.buf, rest)));
        }
        self.buf.drain(..end);
        Some(Received::Messages(messages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bgp4mesh_bgp::wire::{
        AsPath, Message, NextHop, Origin, PathAttributes, UpdateBuilder, error_code,
    };
    use ipnet::IpNet;

    const CODEC: Codec = Codec {
        four_octet_as: true,
        extended_message: false,
        ebgp: true,
    };

    fn update(prefixes: &[&str]) -> Vec<u8> {
        let attrs = PathAttributes {
            origin: Origin::Igp,
            as_path: AsPath::sequence([65001]),
            next_hop: Some(NextHop::V4([192, 0, 2, 1].into())),
            ..PathAttributes::default()
        };
        let prefixes: Vec<IpNet> = prefixes
            .iter()
            .map(|p| p.parse().expect("prefix"))
            .collect();
        let mut out = Vec::new();
        UpdateBuilder::new(CODEC).announce(&mut out, &attrs, &prefixes);
        out
    }

    /// `message` with its header's length field set to `len`.
    fn with_length(mut message: Vec<u8>, len: u16) -> Vec<u8> {
        message[16..18].copy_from_slice(&len.to_be_bytes());
        message
    }

    fn feed(reader: &mut MessageReader, bytes: &[u8], codec: Option<&Codec>) -> Vec<Received> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(READ_SIZE) {
            reader.space()[..chunk.len()].copy_from_slice(chunk);
            reader.filled(chunk.len());
            out.extend(reader.take(codec));
        }
        out
    }

    fn announced(received: &[Received]) -> Vec<String> {
        let mut out = Vec::new();
        for r in received {
            let Received::Messages(messages) = r else {
                panic!("bytes, not messages")
            };
            for m in messages {
                let Ok(Decoded::Update(u)) = m else {
                    panic!("not an UPDATE: {m:?}")
                };
                out.extend(u.update.nlri.iter().map(|p| p.to_string()));
            }
        }
        out
    }

    #[test]
    fn messages_split_anywhere_come_out_whole_and_in_order() {
        let mut stream = update(&["192.0.2.0/24", "198.51.100.0/24"]);
        stream.extend(update(&["203.0.113.0/24"]));
        stream.extend(Message::Keepalive.encode(&CODEC));
        for cut in 0..stream.len() {
            let mut reader = MessageReader::default();
            let mut out = feed(&mut reader, &stream[..cut], Some(&CODEC));
            out.extend(feed(&mut reader, &stream[cut..], Some(&CODEC)));
            let messages: Vec<_> = out
                .into_iter()
                .flat_map(|r| match r {
                    Received::Messages(m) => m,
                    Received::Bytes(_) => panic!("bytes with a codec"),
                })
                .collect();
            assert_eq!(messages.len(), 3, "cut at {cut}");
            assert!(matches!(
                messages[2],
                Ok(Decoded::Message(Message::Keepalive))
            ));
            let nlri = announced(&[Received::Messages(messages.into_iter().take(2).collect())]);
            assert_eq!(nlri, ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"]);
        }
    }

    #[test]
    fn before_the_codec_whole_messages_go_on_as_bytes() {
        let first = update(&["192.0.2.0/24"]);
        let second = update(&["198.51.100.0/24"]);
        let mut reader = MessageReader::default();
        let mut stream = first.clone();
        stream.extend(&second[..10]);
        match feed(&mut reader, &stream, None).as_slice() {
            [Received::Bytes(b)] => assert_eq!(b, &first, "only the whole message"),
            other => panic!("{other:?}"),
        }
        // The codec arrives: the rest of the second message is decoded.
        let out = feed(&mut reader, &second[10..], Some(&CODEC));
        assert_eq!(announced(&out), ["198.51.100.0/24"]);
    }

    #[test]
    fn a_bad_message_is_the_last_one_passed_on() {
        let mut bad = update(&["192.0.2.0/24"]);
        bad[0] = 0; // not the marker
        let mut stream = update(&["198.51.100.0/24"]);
        stream.extend(&bad);
        stream.extend(update(&["203.0.113.0/24"]));
        let mut reader = MessageReader::default();
        let out = feed(&mut reader, &stream, Some(&CODEC));
        let [Received::Messages(m)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(m.len(), 2);
        assert!(matches!(&m[1], Err(n) if n.code == error_code::HEADER));
        assert!(feed(&mut reader, &update(&["10.0.0.0/8"]), Some(&CODEC)).is_empty());
    }

    #[test]
    fn a_bad_header_is_answered_before_its_length_has_come() {
        let mut stream = update(&["192.0.2.0/24"]);
        // A header claiming more than 4096 bytes without extended messages.
        stream.extend(with_length(update(&["198.51.100.0/24"]), 5000));
        let mut reader = MessageReader::default();
        let out = feed(&mut reader, &stream, Some(&CODEC));
        let [Received::Messages(m)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(m.len(), 2);
        assert!(matches!(&m[1], Err(n) if n.code == error_code::HEADER));
    }

    #[test]
    fn before_the_codec_a_header_longer_than_4096_goes_on_unframed_at_once() {
        let mut header = with_length(update(&["192.0.2.0/24"]), 5000);
        header.truncate(19);
        let mut reader = MessageReader::default();
        match feed(&mut reader, &header, None).as_slice() {
            [Received::Bytes(b)] => assert_eq!(b, &header, "for the session to judge now"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn before_the_codec_a_header_wrong_under_any_codec_goes_on_unframed() {
        let mut stream = update(&["192.0.2.0/24"]);
        stream.extend(with_length(update(&["198.51.100.0/24"]), 5));
        let mut reader = MessageReader::default();
        match feed(&mut reader, &stream, None).as_slice() {
            [Received::Bytes(b)] => assert_eq!(b, &stream, "all of it, for the session to refuse"),
            other => panic!("{other:?}"),
        }
        match feed(&mut reader, b"more", Some(&CODEC)).as_slice() {
            [Received::Bytes(b)] => assert_eq!(b, b"more"),
            other => panic!("{other:?}"),
        }
    }

    /// Messages and errors of a whole run, for comparing runs: bytes
    /// passed on unframed are joined, however they were cut.
    fn outcome(received: Vec<Received>) -> Vec<String> {
        let mut out = Vec::new();
        let mut bytes: Option<Vec<u8>> = None;
        for r in received {
            match r {
                Received::Bytes(b) => bytes.get_or_insert_with(Vec::new).extend(b),
                Received::Messages(m) => {
                    out.extend(bytes.take().map(|b| format!("bytes {b:?}")));
                    out.extend(m.iter().map(|m| format!("{m:?}")));
                }
            }
        }
        out.extend(bytes.take().map(|b| format!("bytes {b:?}")));
        out
    }

    proptest::proptest! {
        /// However the stream is cut into reads (whole messages, a damaged
        /// byte anywhere), the same messages and the same error come out,
        /// in the same order, and nothing panics.
        #[test]
        fn reads_cut_anywhere_give_what_one_read_gives(
            count in 1usize..8,
            damage in proptest::option::of((0usize..2000, proptest::num::u8::ANY)),
            cuts in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let mut stream = Vec::new();
            for i in 0..count {
                if i % 3 == 2 {
                    stream.extend(Message::Keepalive.encode(&CODEC));
                } else {
                    stream.extend(update(&["192.0.2.0/24", "198.51.100.0/25"]));
                }
            }
            if let Some((at, byte)) = damage {
                let at = at % stream.len();
                stream[at] = byte;
            }
            let mut whole = MessageReader::default();
            let expected = outcome(feed(&mut whole, &stream, Some(&CODEC)));
            let mut reader = MessageReader::default();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*cut).min(rest.len()));
                got.extend(feed(&mut reader, now, Some(&CODEC)));
                rest = later;
            }
            proptest::prop_assert_eq!(outcome(got), expected);
        }
    }
}
