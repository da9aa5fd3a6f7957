//! Exchanges (filled in next).
