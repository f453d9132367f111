//! Measures what the agent and the collector pay per profile: building, gzip encoding and size,
//! bounded decode and merge of N profiles, for two shapes of one 10 s CPU interval at 100 Hz:
//! "typical" (4 busy threads, 300 distinct stacks 30 frames deep) and "busy" (16 threads, 2 000
//! stacks 40 deep), over 3 000 functions, half Python frames, half native with a mapping, the
//! same code paths every interval. Run:
//! `cargo run --release -p infertap-proto --example pprof_merge_cost [N...]`.

use std::time::Instant;

use infertap_proto::pprof::{
    self, LabelFilter, Line, Mapping, Merger, ProfileBuilder, ProfileKind, SampleLabel,
};

/// xorshift64: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Shape {
    name: &'static str,
    threads: usize,
    stacks: usize,
    depth: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "typical",
        threads: 4,
        stacks: 300,
        depth: 30,
    },
    Shape {
        name: "busy",
        threads: 16,
        stacks: 2000,
        depth: 40,
    },
];

fn interval_profile(shape: &Shape, seed: u64, start_ns: u64) -> pprof::pb::Profile {
    // The same code paths every interval (stack shapes from a fixed seed); which of them are
    // sampled, and how often, varies.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut b = ProfileBuilder::new(ProfileKind::Cpu);
    b.set_time(start_ns, start_ns + 10_000_000_000);
    b.set_period("cpu", "nanoseconds", 10_000_000);
    let lib = b.mapping(&Mapping {
        memory_start: 0x7f00_0000_0000,
        memory_limit: 0x7f00_1000_0000,
        filename: "/usr/lib/x86_64-linux-gnu/libtorch_cpu.so",
        build_id: "0123456789abcdef0123456789abcdef01234567",
        has_functions: true,
        ..Default::default()
    });
    let names: Vec<String> = (0..3000)
        .map(|i| format!("module{}.Class{}.method_{i}", i % 50, i % 200))
        .collect();
    let files: Vec<String> = (0..300)
        .map(|i| format!("/opt/venv/lib/python3.12/site-packages/vllm/pkg{i}/mod.py"))
        .collect();
    // Distinct stacks sharing a common root.
    let stacks: Vec<Vec<pprof::LocationId>> = (0..shape.stacks)
        .map(|s| {
            (0..shape.depth)
                .map(|d| {
                    let f = if d < 5 {
                        d
                    } else {
                        (rng.next() % 3000) as usize
                    };
                    if f % 2 == 0 {
                        b.python_frame(&names[f], &files[f % 300], 10, 10 + (s % 7) as i64)
                    } else {
                        b.native_frame(
                            Some(lib),
                            0x7f00_0000_0000 + (f as u64) * 64,
                            &[Line {
                                name: &names[f],
                                system_name: &names[f],
                                ..Default::default()
                            }],
                        )
                    }
                })
                .rev()
                .collect()
        })
        .collect();
    let threads: Vec<String> = (0..shape.threads).map(|t| format!("worker-{t}")).collect();
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    // 100 Hz for 10 s on every thread.
    for _ in 0..shape.threads * 1000 {
        let s = &stacks[(rng.next() % shape.stacks as u64) as usize];
        let t = &threads[(rng.next() % shape.threads as u64) as usize];
        b.add_sample(s, &[1, 10_000_000], &[SampleLabel::str("thread", t)])
            .unwrap();
    }
    b.build()
}

fn main() {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![1, 6, 60, 360]
    } else {
        counts
    };
    for shape in &SHAPES {
        run(shape, &counts);
    }
}

fn run(shape: &Shape, counts: &[usize]) {
    let max = *counts.iter().max().unwrap();
    let t = Instant::now();
    let profiles: Vec<pprof::pb::Profile> = (0..max as u64)
        .map(|i| interval_profile(shape, i + 1, 1_764_583_200_000_000_000 + i * 10_000_000_000))
        .collect();
    println!(
        "[{}] built {max} profiles ({} samples, {} distinct) in {:.1} ms each",
        shape.name,
        pprof::total(&profiles[0], 0),
        profiles[0].sample.len(),
        t.elapsed().as_secs_f64() * 1e3 / max as f64
    );
    let t = Instant::now();
    let encoded: Vec<Vec<u8>> = profiles.iter().map(pprof::encode_gzip).collect();
    println!(
        "gzip encode: {:.1} ms each, {:.0} KiB gzipped ({:.0} KiB raw)",
        t.elapsed().as_secs_f64() * 1e3 / max as f64,
        encoded[0].len() as f64 / 1024.0,
        prost::Message::encoded_len(&profiles[0]) as f64 / 1024.0
    );
    let t = Instant::now();
    for e in &encoded {
        pprof::decode(e, 256 << 20).unwrap();
    }
    println!(
        "decode + validate: {:.1} ms each",
        t.elapsed().as_secs_f64() * 1e3 / max as f64
    );
    for &n in counts {
        let t = Instant::now();
        let mut m = Merger::new(LabelFilter::default());
        for e in &encoded[..n] {
            m.add_encoded(e, 256 << 20).unwrap();
        }
        let merged = m.finish().unwrap();
        let merge = t.elapsed();
        let t = Instant::now();
        let out = pprof::encode_gzip(&merged);
        println!(
            "merge of {n:>4} (decode + merge): {:>8.1} ms ({:.1} ms/profile); result {} samples, {} distinct, {:.0} KiB gzipped, encoded in {:.1} ms",
            merge.as_secs_f64() * 1e3,
            merge.as_secs_f64() * 1e3 / n as f64,
            pprof::total(&merged, 0),
            merged.sample.len(),
            out.len() as f64 / 1024.0,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
