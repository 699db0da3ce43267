//! Any bytes, cut into lines as the daemon's control socket reads them and
//! parsed as requests: must never panic, every refused line gets an answer
//! that is one line of JSON, and a request that parses keeps its meaning
//! through the line a client sends for it.
#![no_main]

use bgp4mesh_node::control::{MAX_LINE, encode, parse_answer, parse_line, request_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if line.len() > MAX_LINE {
            continue;
        }
        match parse_line(line) {
            Ok(request) => {
                let sent = request_line(&request).expect("a request has a JSON form");
                let sent = sent
                    .strip_suffix(b"\n")
                    .expect("a request line ends the line");
                assert!(!sent.contains(&b'\n'), "one line");
                assert_eq!(parse_line(sent), Ok(request), "the same request back");
            }
            Err(refused) => {
                assert!(!refused.ok && refused.error.is_some());
                let answer = encode(&refused);
                assert_eq!(
                    answer.iter().filter(|&&b| b == b'\n').count(),
                    1,
                    "one line"
                );
                let back = parse_answer(&answer).expect("the answer parses");
                assert_eq!(back, refused);
            }
        }
    }
});
