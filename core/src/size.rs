//! Byte counts as people read them, for log lines and error messages: "128 KiB", or
//! "2 MiB (2097152 bytes)" where the exact count matters too.
//!
//! In the core so that both frontends and the server word sizes alike.

use std::fmt;

const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// A byte count in binary units: `512 bytes`, `128 KiB`, `1.5 MiB`. Whole multiples of the unit
/// are written without decimals; other values with one (rounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in its unit and the exact count: `2 MiB (2097152 bytes)`; below 1 KiB just
    /// `512 bytes`. For a size that was measured (a frame, a file), where the operator may want
    /// the number itself.
    pub fn exact(self) -> Exact {
        Exact(self)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n < 1024 {
            return if n == 1 { f.write_str("1 byte") } else { write!(f, "{n} bytes") };
        }
        // The largest unit the value is at least one of (1024^(i+1)).
        let mut unit = 0;
        while unit + 1 < UNITS.len() && n >> (10 * (unit + 2)) > 0 {
            unit += 1;
        }
        let scale = 1u64 << (10 * (unit + 1));
        if n.is_multiple_of(scale) {
            write!(f, "{} {}", n / scale, UNITS[unit])
        } else {
            write!(f, "{:.1} {}", n as f64 / scale as f64, UNITS[unit])
        }
    }
}

/// See [`ByteSize::exact`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exact(ByteSize);

impl fmt::Display for Exact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 .0 < 1024 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{} ({} bytes)", self.0, self.0 .0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> String {
        ByteSize(n).to_string()
    }

    #[test]
    fn small_counts_are_bytes() {
        assert_eq!(s(0), "0 bytes");
        assert_eq!(s(1), "1 byte");
        assert_eq!(s(1023), "1023 bytes");
    }

    #[test]
    fn whole_multiples_have_no_decimals() {
        assert_eq!(s(1024), "1 KiB");
        assert_eq!(s(131_072), "128 KiB");
        assert_eq!(s(2 * 1024 * 1024), "2 MiB");
        assert_eq!(s(512 * 1024 * 1024), "512 MiB");
        assert_eq!(s(3 << 40), "3 TiB");
    }

    #[test]
    fn other_values_have_one_decimal() {
        assert_eq!(s(1536), "1.5 KiB");
        assert_eq!(s(50_000_000), "47.7 MiB");
        assert_eq!(s(1_048_577), "1.0 MiB");
        assert_eq!(s(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn exact_adds_the_count_above_a_kibibyte() {
        assert_eq!(ByteSize(2_097_152).exact().to_string(), "2 MiB (2097152 bytes)");
        assert_eq!(ByteSize(1_500_000).exact().to_string(), "1.4 MiB (1500000 bytes)");
        assert_eq!(ByteSize(300).exact().to_string(), "300 bytes");
    }
}
