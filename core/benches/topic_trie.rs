//! Topic trie benchmarks (written with the trie).
fn main() {}
