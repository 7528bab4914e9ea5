//! `cargo xtask bench fleet`: arithmetic, not a measurement of this
//! machine. N nodes poll one static repository the way the agent does
//! (`[update] interval`, default 1 h, plus up to a tenth more at random per
//! poll: agent/src/config/update.rs and `with_jitter` in
//! agent/src/update/mod.rs); a release appears at t = 0 with rollout waves
//! (bucket < percent from each wave's start: manifest `waves`). Each node
//! that may install downloads what one install costs (full payload or
//! delta: bytes and requests per node, from `cargo xtask bench delta`) at
//! its link rate. The simulator counts, per second, the requests the
//! repository answers and the bytes it sends, for the full and the delta
//! download of the same release, with one deterministic seed.

use anyhow::{bail, Context as _, Result};

/// A manifest poll: `manifest.json` and `manifest.json.sig`.
pub const POLL_REQUESTS: u64 = 2;

#[derive(Debug, clap::Args)]
pub struct FleetBenchArgs {
    /// Nodes in the fleet (up to 100 000 or more).
    #[arg(long, default_value_t = 100_000)]
    pub nodes: u32,
    /// Poll interval in seconds (the agent's default `[update] interval`).
    #[arg(long, default_value_t = 3600)]
    pub interval: u64,
    /// Rollout waves as HOURS:PERCENT from the release, e.g. `0:10`
    /// `24:100`; repeatable. Default: the example of
    /// docs/update-repository.md, 10 % at once and 100 % a day later.
    #[arg(long = "wave", value_name = "HOURS:PERCENT")]
    pub waves: Vec<String>,
    /// Bytes the repository serves per polling node (manifest and
    /// signatures).
    #[arg(long, default_value_t = 8_192)]
    pub poll_bytes: u64,
    /// Bytes one node downloads for the full update.
    #[arg(long)]
    pub full_bytes: u64,
    /// Requests of one full update (after the poll).
    #[arg(long, default_value_t = 2)]
    pub full_requests: u64,
    /// Bytes one node downloads for the delta update.
    #[arg(long)]
    pub delta_bytes: u64,
    /// Requests of one delta update (after the poll).
    #[arg(long)]
    pub delta_requests: u64,
    /// Each node's download rate in Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub link_mbit: u64,
    /// Seed of the node phases, buckets and jitter.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// SplitMix64: a deterministic stream for the simulation (not security).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// A rollout wave: from `start` seconds after the release, buckets below
/// `percent` may install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wave {
    pub start: u64,
    pub percent: u8,
}

/// What one node downloads for the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    pub bytes: u64,
    pub requests: u64,
}

/// The simulation's inputs.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub nodes: u32,
    pub interval: u64,
    pub waves: Vec<Wave>,
    pub poll_bytes: u64,
    /// Bytes per second of one node's link.
    pub link: u64,
    pub seed: u64,
}

/// What the repository saw while the fleet rolled.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Most requests in one second.
    pub peak_rps: u64,
    /// Mean requests per second over the simulated span.
    pub mean_rps: f64,
    /// Most bytes sent in one second.
    pub peak_bytes_per_s: u64,
    /// Bytes sent for the release (downloads only, polls excluded).
    pub release_bytes: u64,
    /// Bytes sent for polls over the span.
    pub poll_bytes: u64,
    /// Seconds from the release until the last node finished downloading.
    pub rolled_in: u64,
    /// Nodes that installed (all of them, unless a wave stops short).
    pub installed: u32,
}

impl Fleet {
    /// When the node in `bucket` may install: the first wave that admits it.
    fn admitted_at(&self, bucket: u8) -> Option<u64> {
        if self.waves.is_empty() {
            return Some(0);
        }
        self.waves
            .iter()
            .filter(|w| bucket < w.percent)
            .map(|w| w.start)
            .min()
    }

    /// The span simulated: the last wave's start plus two polls.
    fn span(&self) -> u64 {
        let last = self.waves.iter().map(|w| w.start).max().unwrap_or(0);
        last + 2 * (self.interval + self.interval / 10) + 1
    }

    /// Runs the fleet against one release download.
    pub fn run(&self, download: Download) -> Outcome {
        let span = self.span();
        let len = usize::try_from(span).unwrap_or(usize::MAX);
        let mut requests = vec![0u64; len + 1];
        let mut bytes = vec![0u64; len + 1];
        let mut rng = Rng::new(self.seed);
        let tenth = self.interval / 10;
        let link = self.link.max(1);
        let (mut release_bytes, mut poll_bytes, mut rolled_in, mut installed) = (0, 0, 0, 0);
        for _ in 0..self.nodes {
            // Nodes booted at random times long ago: each is somewhere in
            // its poll cycle when the release appears.
            let mut t = rng.below(self.interval + tenth);
            let bucket = u8::try_from(rng.below(100)).unwrap_or(0);
            let admitted = self.admitted_at(bucket);
            let mut done = false;
            while t < span {
                let sec = usize::try_from(t).unwrap_or(len);
                requests[sec] += POLL_REQUESTS;
                bytes[sec] += self.poll_bytes;
                poll_bytes += self.poll_bytes;
                if !done && admitted.is_some_and(|a| t >= a) {
                    done = true;
                    installed += 1;
                    release_bytes += download.bytes;
                    requests[sec] += download.requests;
                    // The body flows at the node's link rate.
                    let mut left = download.bytes;
                    let mut s = sec;
                    while left > 0 && s < len {
                        let now = left.min(link);
                        bytes[s] += now;
                        left -= now;
                        s += 1;
                    }
                    rolled_in = rolled_in.max(t + download.bytes.div_ceil(link));
                }
                t += self.interval + rng.below(tenth);
            }
        }
        Outcome {
            peak_rps: requests.iter().copied().max().unwrap_or(0),
            mean_rps: requests.iter().sum::<u64>() as f64 / span.max(1) as f64,
            peak_bytes_per_s: bytes.iter().copied().max().unwrap_or(0),
            release_bytes,
            poll_bytes,
            rolled_in,
            installed,
        }
    }
}

fn parse_wave(s: &str) -> Result<Wave> {
    let (h, p) = s
        .split_once(':')
        .with_context(|| format!("--wave {s:?}: expected HOURS:PERCENT"))?;
    let hours: f64 = h.parse().with_context(|| format!("--wave {s:?}: hours"))?;
    let percent: u8 = p
        .parse()
        .with_context(|| format!("--wave {s:?}: percent"))?;
    if !(1..=100).contains(&percent) {
        bail!("--wave {s:?}: percent must be 1..=100");
    }
    let start = std::time::Duration::try_from_secs_f64(hours * 3600.0)
        .with_context(|| format!("--wave {s:?}: hours must be a number of at least 0"))?;
    Ok(Wave {
        start: start.as_secs(),
        percent,
    })
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

pub fn run(args: FleetBenchArgs) -> Result<()> {
    let waves = if args.waves.is_empty() {
        vec![
            Wave {
                start: 0,
                percent: 10,
            },
            Wave {
                start: 24 * 3600,
                percent: 100,
            },
        ]
    } else {
        args.waves
            .iter()
            .map(|w| parse_wave(w))
            .collect::<Result<_>>()?
    };
    if args.interval == 0 {
        bail!("--interval must be at least 1 s");
    }
    let fleet = Fleet {
        nodes: args.nodes,
        interval: args.interval,
        waves: waves.clone(),
        poll_bytes: args.poll_bytes,
        link: args.link_mbit * 1_000_000 / 8,
        seed: args.seed,
    };
    let full = fleet.run(Download {
        bytes: args.full_bytes,
        requests: args.full_requests,
    });
    let delta = fleet.run(Download {
        bytes: args.delta_bytes,
        requests: args.delta_requests,
    });
    let waves_text: Vec<String> = waves
        .iter()
        .map(|w| format!("{} % from +{} h", w.percent, w.start as f64 / 3600.0))
        .collect();
    println!(
        "Fleet of {} nodes polling every {} s (+ up to a tenth), waves: {}; links {} Mbit/s; seed {}.\n",
        args.nodes,
        args.interval,
        waves_text.join(", "),
        args.link_mbit,
        args.seed
    );
    println!("| | per node | peak req/s | mean req/s | peak egress | egress per release | rolled in | installed |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, d, o) in [
        ("full", args.full_bytes, &full),
        ("delta", args.delta_bytes, &delta),
    ] {
        println!(
            "| {name} | {} | {} | {:.1} | {}/s ({:.2} Gbit/s) | {} | {:.1} h | {} |",
            human_bytes(d as f64),
            o.peak_rps,
            o.mean_rps,
            human_bytes(o.peak_bytes_per_s as f64),
            o.peak_bytes_per_s as f64 * 8.0 / 1e9,
            human_bytes(o.release_bytes as f64),
            o.rolled_in as f64 / 3600.0,
            o.installed,
        );
    }
    println!(
        "\ndelta / full: egress per release {:.2} %, peak egress {:.2} %, peak requests {:.2}x; polls served {} over the span.",
        100.0 * delta.release_bytes as f64 / full.release_bytes.max(1) as f64,
        100.0 * delta.peak_bytes_per_s as f64 / full.peak_bytes_per_s.max(1) as f64,
        delta.peak_rps as f64 / full.peak_rps.max(1) as f64,
        human_bytes(full.poll_bytes as f64),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(waves: Vec<Wave>) -> Fleet {
        Fleet {
            nodes: 10,
            interval: 100,
            waves,
            poll_bytes: 10,
            link: 1_000,
            seed: 7,
        }
    }

    #[test]
    fn a_tiny_fleet_adds_up() {
        let f = tiny(vec![]);
        let o = f.run(Download {
            bytes: 5_000,
            requests: 3,
        });
        // Every node installs once, at its first poll (no waves).
        assert_eq!(o.installed, 10);
        assert_eq!(o.release_bytes, 50_000);
        // Span 2 * 110 + 1; each node polls at most every 100 s and at
        // least every 110 s, from a phase below 110: 2 or 3 polls each.
        let polls = o.poll_bytes / 10;
        assert!((20..=30).contains(&polls), "{polls}");
        let total_requests = polls * POLL_REQUESTS + 10 * 3;
        assert!((o.mean_rps * 221.0 - total_requests as f64).abs() < 1e-6);
        // Each download takes 5 s at 1000 B/s and starts within the first
        // poll cycle.
        assert!(o.rolled_in >= 5 && o.rolled_in <= 110 + 5, "{o:?}");
        // A node's link caps what one second carries; ten nodes at most
        // ten links plus their polls.
        assert!(o.peak_bytes_per_s <= 10 * (1_000 + 10), "{o:?}");
        assert!(o.peak_bytes_per_s >= 1_000, "{o:?}");
        // Same seed, same outcome.
        assert_eq!(
            o,
            f.run(Download {
                bytes: 5_000,
                requests: 3
            })
        );
    }

    #[test]
    fn waves_hold_nodes_back_until_their_start() {
        let f = Fleet {
            nodes: 1_000,
            ..tiny(vec![
                Wave {
                    start: 0,
                    percent: 10,
                },
                Wave {
                    start: 1_000,
                    percent: 100,
                },
            ])
        };
        let o = f.run(Download {
            bytes: 100,
            requests: 1,
        });
        assert_eq!(o.installed, 1_000);
        // The last nodes start after the second wave, within a cycle.
        assert!(
            o.rolled_in >= 1_000 && o.rolled_in <= 1_000 + 110 + 1,
            "{o:?}"
        );
        // A wave that never reaches some buckets leaves them out.
        let partial = Fleet {
            nodes: 1_000,
            ..tiny(vec![Wave {
                start: 0,
                percent: 1,
            }])
        }
        .run(Download {
            bytes: 100,
            requests: 1,
        });
        assert!((1..=30).contains(&partial.installed), "{partial:?}");
    }

    #[test]
    fn smaller_downloads_mean_less_egress_at_the_same_request_peak_shape() {
        let f = Fleet {
            nodes: 2_000,
            ..tiny(vec![])
        };
        let full = f.run(Download {
            bytes: 100_000,
            requests: 2,
        });
        let delta = f.run(Download {
            bytes: 5_000,
            requests: 2,
        });
        assert_eq!(delta.release_bytes * 20, full.release_bytes);
        assert!(delta.peak_bytes_per_s < full.peak_bytes_per_s);
        assert_eq!(delta.peak_rps, full.peak_rps);
    }

    #[test]
    fn waves_parse_and_refuse_nonsense() {
        assert_eq!(
            parse_wave("24:100").unwrap(),
            Wave {
                start: 86_400,
                percent: 100
            }
        );
        for bad in ["", "24", "x:10", "1:0", "1:101", "-1:10"] {
            assert!(parse_wave(bad).is_err(), "{bad}");
        }
    }
}
