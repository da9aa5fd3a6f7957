//! MQTT codec hot paths: decoding and encoding a QoS 1 PUBLISH (5.0 and 3.1.1).
//! Run with `cargo bench -p ferry-mqtt --bench codec`.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry_mqtt::codec::{encode, encoded_len, Decoder, Packet, Properties, ProtocolVersion, Publish, QoS, Str};

fn publish(payload_len: usize) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Str::from_static("sensors/building-7/floor-3/temperature"),
        packet_id: Some(42),
        properties: Properties::default(),
        payload: Bytes::from(vec![0x5A; payload_len]),
    })
}

fn bench(c: &mut Criterion) {
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        for payload_len in [64, 4096] {
            let packet = publish(payload_len);
            let mut wire = BytesMut::new();
            // 64 packets back to back, as a read of a busy connection would deliver them.
            for _ in 0..64 {
                encode(&packet, version, &mut wire);
            }
            let mut group = c.benchmark_group(format!("publish_{version:?}_{payload_len}B"));
            group.throughput(Throughput::Elements(64));
            group.bench_function("decode_64", |b| {
                b.iter_batched_ref(
                    || (Decoder::with_version(u32::MAX, version), wire.clone()),
                    |(d, buf)| {
                        while let Some(p) = d.decode(buf).unwrap() {
                            std::hint::black_box(p);
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
            let mut out = BytesMut::with_capacity(wire.len());
            group.bench_function("encode_64", |b| {
                b.iter(|| {
                    out.clear();
                    for _ in 0..64 {
                        encode(std::hint::black_box(&packet), version, &mut out);
                    }
                    std::hint::black_box(out.len())
                })
            });
            group.bench_function("encoded_len", |b| b.iter(|| encoded_len(std::hint::black_box(&packet), version)));
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
