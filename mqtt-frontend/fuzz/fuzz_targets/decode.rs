//! Arbitrary bytes into the MQTT decoder, before any CONNECT and after a valid CONNECT of each
//! version. Must never panic; `Ok(None)` must consume nothing; every decoded packet must
//! re-encode to `encoded_len` bytes and decode back to itself.
#![no_main]

use bytes::{Bytes, BytesMut};
use ferry_mqtt::codec::{encode, encoded_len, Connect, Decoder, Packet, Properties, ProtocolVersion, Str};
use libfuzzer_sys::fuzz_target;

fn connect(version: ProtocolVersion) -> BytesMut {
    let c = Connect {
        bridge: false,
        version,
        clean_start: true,
        keep_alive: 30,
        client_id: Str::from_static("fuzz"),
        will: None,
        username: Some(Str::from_static("u")),
        password: Some(Bytes::from_static(b"p")),
        properties: Properties::default(),
    };
    let mut out = BytesMut::new();
    encode(&Packet::Connect(Box::new(c)), version, &mut out);
    out
}

fn check_round_trip(p: &Packet, version: ProtocolVersion) {
    let mut out = BytesMut::new();
    encode(p, version, &mut out);
    assert_eq!(out.len(), encoded_len(p, version), "encoded_len of {p:?}");
    let mut d = Decoder::with_version(u32::MAX, version);
    let again = d.decode(&mut out).expect("re-encoded packet decodes");
    assert_eq!(again.as_ref(), Some(p), "round trip");
    assert!(out.is_empty());
}

fn drain(mut d: Decoder, data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match d.decode(&mut buf) {
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return;
            }
            Ok(Some(p)) => {
                assert!(buf.len() < before, "a packet consumed nothing");
                let version = d.version().expect("a version once a packet decoded");
                check_round_trip(&p, version);
            }
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Small limit on one decoder so TooLarge paths run too.
    drain(Decoder::new(if data.first().is_some_and(|b| b & 1 == 1) { 64 } else { 1 << 20 }), data);
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut d = Decoder::new(1 << 20);
        let mut buf = connect(version);
        assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Connect(_)))));
        assert_eq!(d.version(), Some(version));
        drain(d, data);
    }
});
