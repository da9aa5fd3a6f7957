//! Codec hot paths: decoding a publish (method + header + body frames) and writing a delivery.
//!
//! Run: `cargo bench -p ferry-amqp --bench codec`.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_amqp::codec::{
    encode_body_frames, encode_deliver, encode_header_frame, encode_method_frame, BasicPublish, ContentHeader, Frame,
    FrameDecoder, Method,
};
use ferry_core::message::{DeliveryMode, FieldTable, FieldValue, MoreProperties, Properties, ShortString};

fn properties() -> Properties {
    let mut headers = FieldTable::new();
    headers.insert("x-source", FieldValue::string("sensor-7"));
    headers.insert("x-seq", FieldValue::I64(12345));
    Properties {
        content_type: Some("application/json".into()),
        delivery_mode: Some(DeliveryMode::Persistent),
        headers: Some(headers),
        ..Default::default()
    }
    .with_more(MoreProperties { message_id: Some("m-1".into()), ..Default::default() })
}

fn publish_wire(body: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    let m: Method =
        BasicPublish { exchange: "amq.topic".into(), routing_key: "sensors.a.temp".into(), ..Default::default() }
            .into();
    encode_method_frame(1, &m, &mut out).unwrap();
    encode_header_frame(1, &ContentHeader::basic(body.len() as u64, properties()), &mut out).unwrap();
    encode_body_frames(&mut out, 1, body, 131_072);
    out.freeze()
}

fn decode_publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_publish");
    for size in [16usize, 1024, 65_536] {
        let wire = publish_wire(&vec![b'x'; size]);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(size), &wire, |b, wire| {
            let decoder = FrameDecoder::new(131_072);
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                let mut n = 0;
                while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                    match frame {
                        Frame::Method { payload, .. } => {
                            n += Method::decode_payload(payload).unwrap().method_id() as usize
                        }
                        Frame::Header { payload, .. } => {
                            n += ContentHeader::decode(payload).unwrap().body_size as usize
                        }
                        Frame::Body { payload, .. } => n += payload.len(),
                        Frame::Heartbeat => {}
                    }
                }
                n
            })
        });
    }
    g.finish();
}

fn encode_delivery(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_deliver");
    let (ctag, ex, rk) = (ShortString::from("amq.ctag-1"), ShortString::from("amq.topic"), ShortString::from("a.b.c"));
    let props = properties();
    for size in [16usize, 1024, 65_536] {
        let body = vec![b'x'; size];
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            let mut out = BytesMut::with_capacity(128 * 1024);
            b.iter(|| {
                out.clear();
                encode_deliver(&mut out, 1, &ctag, 42, false, &ex, &rk, &props, body, 131_072).unwrap();
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode_publish, encode_delivery);
criterion_main!(benches);
