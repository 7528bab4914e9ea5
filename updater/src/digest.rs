//! SHA-256 for the bulk paths (streaming install, read-back, repository
//! tools). ring's assembly uses the CPU's SHA extensions (SHA-NI on x86_64,
//! the ARMv8 SHA2 instructions on aarch64) whatever the optimisation level;
//! the `sha2` crate's SHA-NI path is Rust intrinsics that the release
//! profile's `opt-level = "s"` leaves at about 280 MiB/s here, and its
//! aarch64 path is software unless built with its `asm` feature.

/// An incremental SHA-256.
pub struct Sha256 {
    ctx: ring::digest::Context,
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Sha256 {
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.ctx.update(bytes);
    }

    /// Lowercase hex of the digest.
    pub fn finish_hex(self) -> String {
        hex::encode(self.ctx.finish().as_ref())
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finish_hex()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn agrees_with_sha2() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
        assert_eq!(sha256_hex(&data), hex::encode(sha2::Sha256::digest(&data)));
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
