//! Properties of the wire codec: what we encode decodes to the same value,
//! and no input whatsoever makes the decoder panic.

use std::net::Ipv4Addr;

use bgp4mesh_bgp::wire::{
    Aggregator, AsPath, AsSegment, Codec, Community, Decoded, LargeCommunity, Message, NextHop,
    Origin, PathAttributes, RawAttribute, SegmentKind, Update, decode_message, next_frame,
};
use ipnet::{IpNet, Ipv4Net};
use proptest::prelude::*;

const IBGP4: Codec = Codec {
    four_octet_as: true,
    extended_message: false,
    ebgp: false,
};
const EBGP2: Codec = Codec {
    four_octet_as: false,
    extended_message: false,
    ebgp: true,
};

fn segment(kinds: Vec<SegmentKind>) -> impl Strategy<Value = AsSegment> {
    (
        prop::sample::select(kinds),
        prop::collection::vec(any::<u32>(), 1..20),
    )
        .prop_map(|(kind, asns)| AsSegment { kind, asns })
}

fn as_path(kinds: Vec<SegmentKind>) -> impl Strategy<Value = AsPath> {
    prop::collection::vec(segment(kinds), 0..4).prop_map(|segments| AsPath { segments })
}

fn unicast_v4() -> impl Strategy<Value = Ipv4Addr> {
    (1u8..224, any::<[u8; 3]>()).prop_map(|(a, [b, c, d])| Ipv4Addr::new(a, b, c, d))
}

fn attributes(path: BoxedStrategy<AsPath>) -> impl Strategy<Value = PathAttributes> {
    (
        (
            prop::sample::select(vec![Origin::Igp, Origin::Egp, Origin::Incomplete]),
            path,
            unicast_v4(),
        ),
        (any::<Option<u32>>(), any::<Option<u32>>(), any::<bool>()),
        (
            any::<Option<(u32, [u8; 4])>>(),
            prop::collection::vec(any::<u32>(), 0..6),
        ),
        (
            prop::collection::vec(any::<u64>(), 0..4),
            prop::collection::btree_set(any::<(u32, u32, u32)>(), 0..4),
        ),
        (
            any::<Option<[u8; 4]>>(),
            prop::collection::vec(any::<[u8; 4]>(), 0..3),
        ),
        prop::collection::btree_map(100u8..200, prop::collection::vec(any::<u8>(), 0..300), 0..3),
    )
        .prop_map(
            |(
                (origin, as_path, hop),
                (med, local_pref, atomic),
                (agg, comms),
                (ext, large),
                (orig, clusters),
                unknown,
            )| {
                PathAttributes {
                    origin,
                    as_path,
                    next_hop: Some(NextHop::V4(hop)),
                    med,
                    local_pref,
                    atomic_aggregate: atomic,
                    aggregator: agg.map(|(asn, a)| Aggregator {
                        asn,
                        address: Ipv4Addr::from(a),
                    }),
                    communities: comms.into_iter().map(Community).collect(),
                    extended_communities: ext,
                    large_communities: large
                        .into_iter()
                        .map(|(global, local1, local2)| LargeCommunity {
                            global,
                            local1,
                            local2,
                        })
                        .collect(),
                    originator_id: orig.map(Ipv4Addr::from),
                    cluster_list: clusters.into_iter().map(Ipv4Addr::from).collect(),
                    unknown: unknown
                        .into_iter()
                        .map(|(code, value)| RawAttribute {
                            flags: 0xe0,
                            code,
                            value,
                        })
                        .collect(),
                }
            },
        )
}

fn prefixes() -> impl Strategy<Value = Vec<IpNet>> {
    prop::collection::vec((any::<u32>(), 0u8..=32), 0..50).prop_map(|v| {
        v.into_iter()
            .filter_map(|(a, len)| Ipv4Net::new(Ipv4Addr::from(a), len).ok())
            .map(|n| IpNet::V4(n.trunc()))
            .collect()
    })
}

#[allow(
    clippy::panic,
    reason = "a test helper: a failed round trip fails the test"
)]
fn round_trip(update: &Update, codec: &Codec) -> Update {
    let bytes = Message::Update(Box::new(update.clone())).encode(codec);
    match decode_message(&bytes, codec) {
        Ok(Decoded::Update(d)) => {
            assert_eq!(d.treat_as_withdraw, None, "{d:?}");
            assert!(d.discarded.is_empty(), "{d:?}");
            d.update
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    #[test]
    fn updates_round_trip_on_a_four_octet_ibgp_session(
        attrs in attributes(as_path(vec![SegmentKind::Sequence, SegmentKind::Set, SegmentKind::ConfedSequence, SegmentKind::ConfedSet]).boxed()),
        nlri in prefixes(),
        withdrawn in prefixes(),
    ) {
        let nlri = if nlri.is_empty() { vec!["192.0.2.0/24".parse().expect("net")] } else { nlri };
        let update = Update { withdrawn, attributes: Some(attrs), nlri, ..Update::default() };
        prop_assert_eq!(round_trip(&update, &IBGP4), update);
    }

    #[test]
    fn four_octet_paths_survive_a_two_octet_ebgp_session(
        attrs in attributes(as_path(vec![SegmentKind::Sequence]).boxed()),
        nlri in prefixes(),
    ) {
        // What eBGP does not carry: LOCAL_PREF, ORIGINATOR_ID, CLUSTER_LIST.
        let attrs = PathAttributes { local_pref: None, originator_id: None, cluster_list: vec![], ..attrs };
        let nlri = if nlri.is_empty() { vec!["192.0.2.0/24".parse().expect("net")] } else { nlri };
        let update = Update { attributes: Some(attrs), nlri, ..Update::default() };
        prop_assert_eq!(round_trip(&update, &EBGP2), update);
    }

    #[test]
    fn no_input_makes_the_decoder_panic(body in prop::collection::vec(any::<u8>(), 0..600), kind in 1u8..=5) {
        let mut bytes = vec![0xff; 16];
        bytes.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        bytes.push(kind);
        bytes.extend_from_slice(&body);
        for codec in [IBGP4, EBGP2] {
            if let Ok(Some((_, len))) = next_frame(&bytes, &codec) {
                let _ = decode_message(&bytes[..len], &codec);
            }
        }
    }

    #[test]
    fn mutated_valid_updates_never_panic(
        attrs in attributes(as_path(vec![SegmentKind::Sequence, SegmentKind::Set]).boxed()),
        nlri in prefixes(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let update = Update { attributes: Some(attrs), nlri, ..Update::default() };
        let mut bytes = Message::Update(Box::new(update)).encode(&IBGP4);
        for (i, v) in flips {
            let at = 19 + i.index(bytes.len() - 19);
            bytes[at] = v;
        }
        for codec in [IBGP4, EBGP2] {
            if let Ok(Some((_, len))) = next_frame(&bytes, &codec) {
                let _ = decode_message(&bytes[..len], &codec);
            }
        }
    }
}
