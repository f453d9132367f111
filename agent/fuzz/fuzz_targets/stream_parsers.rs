//! The stream splitters (SSE, NDJSON) and the payload classifier on arbitrary bytes: no panic,
//! bounded events, and the same events whether a body comes in one syscall or split at two
//! fuzz-chosen points (events must not depend on where the writes fell).
#![no_main]

use infertap::protocol::ndjson::LineSplitter;
use infertap::protocol::openai::classify_event;
use infertap::protocol::shape::{finish_vocabulary, FINISH_REASONS};
use infertap::protocol::sse::{SseSplitter, MAX_EVENT_NAME_BYTES};
use libfuzzer_sys::fuzz_target;

type Event = (Vec<u8>, Vec<u8>, bool);

fn check_payload(name: &[u8], data: &[u8]) {
    let info = classify_event(name, data);
    if let Some(fr) = &info.finish_reason {
        assert!(FINISH_REASONS.contains(&finish_vocabulary(fr)));
    }
    if info.content {
        assert!(info.tokens > 0 || !info.choices.is_empty());
    }
    assert!(info.choices.len() <= 256);
}

fn sse(max: usize, parts: &[&[u8]]) -> (Vec<Event>, bool) {
    let mut sp = SseSplitter::new(max);
    let mut out = Vec::new();
    for p in parts {
        sp.feed(p, &mut |e| {
            assert!(e.data.len() <= max && e.name.len() <= MAX_EVENT_NAME_BYTES);
            check_payload(e.name, e.data);
            out.push((e.name.to_vec(), e.data.to_vec(), e.truncated));
        });
    }
    let cut = sp.finish();
    (out, cut)
}

fn lines(max: usize, parts: &[&[u8]]) -> Vec<Event> {
    let mut sp = LineSplitter::new(max);
    let mut out = Vec::new();
    let mut emit = |l: infertap::protocol::ndjson::Line<'_>| {
        assert!(l.data.len() <= max);
        check_payload(b"", l.data);
        out.push((Vec::new(), l.data.to_vec(), l.truncated));
    };
    for p in parts {
        sp.feed(p, &mut emit);
    }
    sp.finish(&mut emit);
    out
}

fuzz_target!(|data: &[u8]| {
    let [ctl, a, b, body @ ..] = data else {
        return;
    };
    let max = 16 + usize::from(*ctl) * 8;
    let mut cuts = [
        usize::from(*a) * body.len() / 255,
        usize::from(*b) * body.len() / 255,
    ];
    cuts.sort_unstable();
    let parts = [&body[..cuts[0]], &body[cuts[0]..cuts[1]], &body[cuts[1]..]];
    assert_eq!(sse(max, &[body]), sse(max, &parts));
    assert_eq!(lines(max, &[body]), lines(max, &parts));
    // Gaps anywhere: still no panic and bounded.
    let mut sp = SseSplitter::new(max);
    let mut ls = LineSplitter::new(max);
    for (i, p) in parts.iter().enumerate() {
        sp.feed(p, &mut |e| check_payload(e.name, e.data));
        ls.feed(p, &mut |l| check_payload(b"", l.data));
        if ctl & (1 << i) != 0 {
            sp.gap(u64::from(*ctl), &mut |e| check_payload(e.name, e.data));
            ls.gap(u64::from(*ctl), &mut |l| check_payload(b"", l.data));
        }
    }
    sp.finish();
    ls.finish(&mut |l| check_payload(b"", l.data));
});
