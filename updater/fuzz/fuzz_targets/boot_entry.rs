//! Fuzzes the boot-entry file-name and contents parsers and the kernel
//! command-line parser: no panics, and whatever parses renders back to
//! something that parses to the same value.
#![no_main]

use ballast_updater::bootentry::{BootEntry, EntryName};
use ballast_updater::cmdline::BootParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = text.parse::<EntryName>() {
        assert_eq!(name.to_string().parse::<EntryName>().ok(), Some(name));
    }
    if let Ok(entry) = BootEntry::parse(text) {
        let again = BootEntry::parse(&entry.render()).expect("re-parse of a rendered entry");
        assert_eq!(again.params, entry.params);
    }
    if let Ok(params) = BootParams::parse(text) {
        assert_eq!(BootParams::parse(&params.to_string()).ok(), Some(params));
    }
});
