//! Links the `ferry` binary with its functions in the order of `symbol-order.txt` (issue 18,
//! the idle broker's RSS): what start-up and an idle broker run first, then the messages' hot
//! paths, then the rest that the profile saw, so that the code an idle broker keeps resident is
//! about 2 MB in one place instead of 6.5-6.9 MB of 64 KiB blocks spread over the 10 MB of text
//! (docs/benchmarks.md, "The idle broker's code").
//! `scripts/symbol-order.sh` writes the file.
//!
//! Only for x86_64-unknown-linux-gnu, where rustc (1.90 and later, the workspace's
//! `rust-version`) links with its own lld, which reads the file; a function it does not name
//! (renamed, new, or a debug build's, whose names carry other hashes) is placed after the listed
//! ones, without a warning. `FERRY_SYMBOL_ORDER=0` leaves it out, for a build with another linker
//! (GNU ld does not know the option) or to compare the two layouts.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=FERRY_SYMBOL_ORDER");
    let target = env::var("TARGET").unwrap_or_default();
    let disabled = env::var("FERRY_SYMBOL_ORDER").is_ok_and(|v| v == "0");
    // A linker chosen in RUSTFLAGS (`-C linker=`, `-C linker-flavor=`, `-C linker-features=`) may
    // not be lld.
    let other_linker = env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|f| f.contains("linker"));
    if target != "x86_64-unknown-linux-gnu" || disabled || other_linker {
        return;
    }
    let manifest = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let order = Path::new(&manifest).join("symbol-order.txt");
    if !order.exists() {
        return;
    }
    println!("cargo:rustc-link-arg-bin=ferry=-Wl,--symbol-ordering-file={}", order.display());
    println!("cargo:rustc-link-arg-bin=ferry=-Wl,--no-warn-symbol-ordering");
}
