//! Any bytes, framed and decoded as every message type with every codec the
//! session may negotiate: must never panic.
#![no_main]

use bgp4mesh_bgp::wire::{Codec, decode_message, next_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for four_octet_as in [false, true] {
        for extended_message in [false, true] {
            for ebgp in [false, true] {
                let codec = Codec { four_octet_as, extended_message, ebgp };
                let mut rest = data;
                while let Ok(Some((_, len))) = next_frame(rest, &codec) {
                    let _ = decode_message(&rest[..len], &codec);
                    rest = &rest[len..];
                }
            }
        }
    }
});
