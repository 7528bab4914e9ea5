//! Fuzzes the decoder of router-advertisement options (RDNSS, DNSSL) in
//! netlink messages and the state they feed: no panics, and the stored
//! state stays within its bounds whatever arrives.
#![no_main]

use std::time::Instant;

use ballast::net::ipv6::{parse_nduseropt, RaState, MAX_RA_DOMAINS, MAX_RA_SERVERS};
use ballast::net::resolv::dns_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut state = RaState::default();
    for ra in parse_nduseropt(data) {
        if let Some(ifindex) = state.update(now, &ra) {
            let entry = state.entry(ifindex);
            assert!(entry.servers.len() <= MAX_RA_SERVERS);
            assert!(entry.domains.len() <= MAX_RA_DOMAINS);
            for d in &entry.domains {
                assert_eq!(dns_name(d).as_deref(), Some(d.as_str()));
            }
        }
    }
    let _ = state.expire(now);
});
