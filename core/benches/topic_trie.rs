//! Topic trie benchmarks: routing-key lookup and bind/unbind churn in a trie of 100,000
//! bindings, against the naive linear scan for scale.
//!
//! Run: `cargo bench -p ferry-core --bench topic_trie -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_core::topic::{Pattern, TopicTrie};

const BINDINGS: usize = 100_000;

const SITES: [&str; 4] = ["farm", "factory", "fleet", "home"];
const SENSORS: [&str; 8] = ["soil", "air", "water", "light", "door", "engine", "gps", "power"];
const METRICS: [&str; 6] = ["moisture", "temp", "humidity", "level", "state", "voltage"];
const STATS: [&str; 3] = ["min", "max", "avg"];
/// Distinct device ids per site; with 100k bindings a cold id carries about ten bindings.
const DEVICES: u64 = 2_000;
const HOT_DEVICES: u64 = 10;

/// Knuth's MMIX LCG: deterministic and dependency-free; quality is irrelevant here.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> usize {
        (self.next() % n) as usize
    }
    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len() as u64)]
    }
}

/// A 3-5 word routing key such as `farm.17.soil.moisture` or `farm.17.soil.moisture.avg`.
/// One device in five is drawn from 10 "hot" ids, so some keys have a larger fan-out.
fn literal_words(rng: &mut Lcg) -> Vec<String> {
    let device = if rng.below(5) == 0 { rng.below(HOT_DEVICES) } else { rng.below(DEVICES) };
    let mut w = vec![rng.pick(&SITES).to_string(), device.to_string(), rng.pick(&SENSORS).to_string()];
    let extra = rng.below(3);
    if extra >= 1 {
        w.push(rng.pick(&METRICS).to_string());
    }
    if extra == 2 {
        w.push(rng.pick(&STATS).to_string());
    }
    w
}

/// 60% literal, 25% one `*`, 10% trailing `#`, 5% `#` at the start or in the middle.
fn binding(rng: &mut Lcg) -> Pattern {
    let mut w = literal_words(rng);
    match rng.below(100) {
        0..=59 => {}
        60..=84 => {
            let i = rng.below(w.len() as u64);
            w[i] = "*".into();
        }
        85..=94 => {
            // `farm.17.#` or `farm.17.soil.#`: a whole-site `farm.#` would match every key.
            w.truncate(2 + rng.below(2));
            w.push("#".into());
        }
        _ => {
            if rng.below(2) == 0 {
                // `#.soil.moisture`
                w.drain(..2);
                w.insert(0, "#".into());
            } else {
                // `farm.17.#.moisture` (a site-wide `farm.#.avg` would match a large share of keys)
                let last = w.pop().expect("3+ words");
                w.truncate(2);
                w.push("#".into());
                w.push(last);
            }
        }
    }
    Pattern::parse_amqp(&w.join("."))
}

fn bindings() -> Vec<Pattern> {
    let mut rng = Lcg(0x5eed);
    (0..BINDINGS).map(|_| binding(&mut rng)).collect()
}

fn build(patterns: &[Pattern]) -> TopicTrie<u32> {
    let mut t = TopicTrie::new();
    for (i, p) in patterns.iter().enumerate() {
        t.insert(p, i as u32);
    }
    t
}

fn count(t: &TopicTrie<u32>, key: &str) -> usize {
    let mut n = 0;
    t.for_each_match(key, |v| {
        black_box(v);
        n += 1
    });
    n
}

/// 64 keys: 48 from the same generator as the bindings, 8 on hot devices and 8 on a site no
/// binding names (only patterns starting with `#` or `*` can match them).
fn key_batch() -> Vec<String> {
    let mut rng = Lcg(0xbeef);
    let mut keys: Vec<String> = (0..48).map(|_| literal_words(&mut rng).join(".")).collect();
    keys.extend((0..8).map(|i| format!("{}.{}.soil.moisture", SITES[i % 4], i)));
    keys.extend((0..8).map(|i| format!("nowhere.{i}.soil.moisture")));
    keys
}

fn bench(c: &mut Criterion) {
    let patterns = bindings();
    let trie = build(&patterns);
    // Values are distinct, so every binding is an entry even where hot devices repeat a pattern.
    assert_eq!(trie.len(), BINDINGS);

    // Representative single keys; the fan-out is printed so the figures can be read against it.
    let singles = [
        ("hot", "farm.7.soil.moisture".to_string()),
        ("cold", "home.777.power.voltage".to_string()),
        ("none", "nowhere.1.soil.unknown".to_string()),
    ];
    for (name, key) in &singles {
        eprintln!("key {name} = {key:?}: {} matches", count(&trie, key));
    }
    let batch = key_batch();
    let total: usize = batch.iter().map(|k| count(&trie, k)).sum();
    eprintln!("batch of {} keys: {} matches in all", batch.len(), total);

    let mut g = c.benchmark_group("match");
    for (name, key) in &singles {
        g.bench_function(*name, |b| b.iter(|| count(&trie, black_box(key))));
    }
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("batch64", |b| b.iter(|| batch.iter().map(|k| count(&trie, black_box(k))).sum::<usize>()));
    g.finish();

    // The same key as `match/hot`, through the reference matcher over every binding.
    let mut g = c.benchmark_group("naive_scan");
    g.sample_size(10);
    let key = &singles[0].1;
    assert_eq!(patterns.iter().filter(|p| p.matches(key)).count(), count(&trie, key));
    g.bench_function("hot", |b| b.iter(|| patterns.iter().filter(|p| p.matches(black_box(key))).count()));
    g.finish();

    let mut g = c.benchmark_group("churn");
    let mut trie = trie;
    let fresh = [
        Pattern::parse_amqp("farm.99999.soil.moisture"),
        Pattern::parse_amqp("farm.7.*.moisture.avg"),
        Pattern::parse_amqp("#.churn.#"),
    ];
    for (name, p) in ["literal", "star", "many_many"].iter().zip(&fresh) {
        g.bench_function(format!("insert_remove/{name}"), |b| {
            b.iter(|| {
                assert!(trie.insert(p, u32::MAX));
                assert!(trie.remove(p, &u32::MAX));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
