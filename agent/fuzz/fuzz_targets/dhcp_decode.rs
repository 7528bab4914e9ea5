//! Fuzzes the DHCPv4 decoder and the client's handling of what a server
//! sends: no panics (PID 1 runs this on every packet), and whatever lease
//! the client accepts passes the sanity checks.
#![no_main]

use std::time::{Duration, Instant};

use ballast::net::dhcp::{code, Message, MessageType, OP_REPLY};
use ballast::net::lease::{check_lease, Action, Client};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut msg) = Message::decode(data) else {
        return;
    };
    let _ = msg.message_type();
    let _ = msg.lease_options();
    let _ = msg.encode();

    // Make the message an answer to this client, so the state machine
    // (offer, then the same bytes as an ACK) sees the fuzzed options.
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut client = Client::new(mac, Some("node-1".into()), 7);
    let t0 = Instant::now();
    let xid = match client.start(t0).first() {
        Some(Action::Send(m, _)) => m.xid,
        _ => return,
    };
    msg.op = OP_REPLY;
    msg.chaddr = mac;
    msg.xid = xid;
    let mut actions = client.on_message(t0, &msg).unwrap_or_default();
    msg.set(code::MESSAGE_TYPE, vec![MessageType::Ack as u8]);
    actions.extend(client.on_message(t0, &msg).unwrap_or_default());
    for a in &actions {
        if let Action::Apply(lease) = a {
            let again = check_lease(lease.address, Some(lease.server), lease.prefix, lease.router);
            assert_eq!(again, Ok(lease.router), "{lease:?}");
            // Lease arithmetic never panics, however long the lease.
            let _ = (lease.renew_at(), lease.rebind_at(), lease.expires_at());
            let _ = lease.remaining(t0 + Duration::from_secs(u64::from(u32::MAX)));
        }
    }
    for secs in [1, 3600, u64::from(u32::MAX)] {
        let _ = client.on_timeout(t0 + Duration::from_secs(secs));
    }
});
