//! Fuzzes the manifest and signature-list parsers and the signature check:
//! none may panic, and whatever parses must re-serialize and parse again.
#![no_main]

use ballast_updater::keys::{SecretKey, TrustedKeys};
use ballast_updater::manifest::{self, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let again = Manifest::parse(&m.to_bytes()).expect("re-parse of a parsed manifest");
        assert_eq!(again, m);
    }
    let _ = manifest::parse_signatures(data);
    // Split the input into manifest bytes and a signature list.
    let cut = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (bytes, sigs) = data.split_at(cut);
    let key = SecretKey::from_seed([1; 32]);
    if let Ok(trust) = TrustedKeys::new([key.public()], 1) {
        let _ = manifest::verify(
            bytes,
            sigs.get(1..),
            &trust,
            std::time::SystemTime::UNIX_EPOCH,
            Some(3),
        );
    }
});
