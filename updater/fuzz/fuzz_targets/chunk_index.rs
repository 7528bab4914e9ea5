//! Fuzzes the chunk index and chunk catalog parsers (what a node reads
//! from a repository before it trusts a single chunk): none may panic, and
//! whatever parses must re-serialize, parse again and still tile its
//! artifact.
#![no_main]

use ballast_updater::chunks::{Catalog, ChunkIndex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = ChunkIndex::parse(data) {
        let again = ChunkIndex::parse(&index.to_bytes()).expect("re-parse of a parsed index");
        assert_eq!(again, index);
        let covered: u64 = index.chunks.iter().map(|c| u64::from(c.length)).sum();
        assert_eq!(covered, index.size);
    }
    if let Ok(catalog) = Catalog::parse(data) {
        let again = Catalog::parse(&catalog.to_bytes()).expect("re-parse of a parsed catalog");
        assert_eq!(again, catalog);
    }
});
