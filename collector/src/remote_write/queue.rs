//! A durable, byte-bounded FIFO of remote-write request bodies on disk, one per store URL.
//!
//! Layout of a queue directory:
//! * `<first record id, 20 digits>.seg`: segment files of records appended in order. A record is
//!   a 24-byte header (magic `RWQ1`, payload length, CRC-32 of what follows the header, sample
//!   count, snapshot timestamp in ms) and the payload (a snappy-compressed `WriteRequest`).
//!   Record ids are consecutive; a segment's records are `first id ..`.
//! * `acked`: the highest record id the store acknowledged (written to a temporary file and
//!   renamed over the old one after every acknowledged request).
//! * `lock`: held (`flock`) while a collector uses the directory, so two collectors cannot share
//!   one queue.
//!
//! Durability (fsync policy): [`Queue::append`] writes a snapshot's records and `fdatasync`s the
//! segment (and the directory when it created a segment) before returning, so an enqueued
//! snapshot survives a crash or power loss. The `acked` file is renamed without fsync: it
//! survives a process crash (SIGKILL); after a power loss the last acknowledged requests may be
//! sent again (stores drop or deduplicate identical samples).
//!
//! Bound: segment files never hold more than `max_bytes` together; past it the oldest segment is
//! deleted whole, and its unsent samples are reported as dropped ([`Appended::dropped_samples`]).
//! Segments roll over at `segment_bytes`. Opening a directory scans every segment: a record that
//! is cut short or fails its CRC (a crash mid-write, disk corruption) ends the segment there:
//! the file is truncated to its last good record and what followed is reported as corrupt.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

const MAGIC: u32 = u32::from_le_bytes(*b"RWQ1");
const HEADER: usize = 24;
/// Largest payload accepted (a sanity bound for the length field of a damaged header).
const MAX_RECORD: usize = 256 << 20;

/// Queue bounds.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Most bytes of segment files kept; the oldest segment goes first.
    pub max_bytes: u64,
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
}

impl QueueConfig {
    /// Segments of `max_bytes / 8`, between 4 KiB and 64 MiB, so dropping one loses at most an
    /// eighth of the queue.
    pub fn new(max_bytes: u64) -> Self {
        QueueConfig {
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(4 << 10, 64 << 20),
        }
    }
}

/// One record read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub id: u64,
    pub samples: u32,
    /// Timestamp of the snapshot the samples carry, unix ms.
    pub ts_ms: i64,
    pub payload: Vec<u8>,
}

/// What [`Queue::open`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Opened {
    /// Records waiting to be sent.
    pub pending_records: u64,
    pub pending_samples: u64,
    /// Bytes cut off damaged segment tails.
    pub corrupt_bytes: u64,
}

/// What one [`Queue::append`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Appended {
    /// Unsent samples of old segments deleted to stay within the bound.
    pub dropped_samples: u64,
    pub dropped_records: u64,
}

/// Sizes for gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QueueStats {
    /// Bytes of segment files on disk.
    pub bytes: u64,
    pub pending_records: u64,
    pub pending_samples: u64,
    /// Snapshot timestamp of the oldest unsent record, unix ms.
    pub oldest_pending_ms: Option<i64>,
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    offset: u64,
    len: u32,
    samples: u32,
    ts_ms: i64,
}

#[derive(Debug)]
struct Segment {
    first_id: u64,
    path: PathBuf,
    records: Vec<Meta>,
    bytes: u64,
}

impl Segment {
    fn end_id(&self) -> u64 {
        self.first_id + self.records.len() as u64
    }
}

#[derive(Debug)]
struct Inner {
    segments: VecDeque<Segment>,
    /// Append handle of the last segment, while it is open for writing.
    head: Option<File>,
    /// Highest acknowledged (or dropped) id; the next to send is `acked + 1`.
    acked: u64,
    next_id: u64,
}

/// A durable queue in one directory (see the module docs).
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    cfg: QueueConfig,
    inner: Mutex<Inner>,
    _lock: File,
}

fn seg_name(first_id: u64) -> String {
    format!("{first_id:020}.seg")
}

fn crc(samples: u32, ts_ms: i64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&samples.to_le_bytes());
    h.update(&ts_ms.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn encode_record(samples: u32, ts_ms: i64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(samples, ts_ms, payload).to_le_bytes());
    out.extend_from_slice(&samples.to_le_bytes());
    out.extend_from_slice(&ts_ms.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Parses the header at the start of `b`: (payload len, crc, samples, ts).
fn parse_header(b: &[u8]) -> Option<(usize, u32, u32, i64)> {
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
    if b.len() < HEADER || u32_at(0) != MAGIC {
        return None;
    }
    let len = u32_at(4) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let ts = i64::from_le_bytes(b[16..24].try_into().unwrap_or([0; 8]));
    Some((len, u32_at(8), u32_at(12), ts))
}

/// Reads a segment's good records; returns them and the length of the good prefix.
fn scan(data: &[u8]) -> (Vec<Meta>, usize) {
    let mut metas = Vec::new();
    let mut off = 0usize;
    while let Some((len, sum, samples, ts_ms)) = parse_header(&data[off..]) {
        let Some(payload) = data.get(off + HEADER..off + HEADER + len) else {
            break;
        };
        if crc(samples, ts_ms, payload) != sum {
            break;
        }
        metas.push(Meta {
            offset: off as u64,
            len: len as u32,
            samples,
            ts_ms,
        });
        off += HEADER + len;
    }
    (metas, off)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Queue {
    /// Opens (creating if needed) the queue in `dir`, recovering what a previous run left.
    pub fn open(dir: &Path, cfg: QueueConfig) -> io::Result<(Queue, Opened)> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        lock.try_lock().map_err(|e| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another collector ({e})", dir.display()),
            )
        })?;
        let acked = match fs::read_to_string(dir.join("acked")) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let mut firsts: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        firsts.sort_unstable();
        let mut opened = Opened::default();
        let mut segments = VecDeque::new();
        for first_id in firsts {
            let path = dir.join(seg_name(first_id));
            let data = fs::read(&path)?;
            let (records, good) = scan(&data);
            if good < data.len() {
                opened.corrupt_bytes += (data.len() - good) as u64;
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(good as u64)?;
            }
            let seg = Segment {
                first_id,
                path,
                records,
                bytes: good as u64,
            };
            // Fully acknowledged (or empty) segments are done.
            if seg.end_id() <= acked + 1 || seg.records.is_empty() {
                fs::remove_file(&seg.path)?;
                continue;
            }
            segments.push_back(seg);
        }
        let next_id = segments
            .back()
            .map_or(acked + 1, |s| s.end_id())
            .max(acked + 1);
        let q = Queue {
            dir: dir.to_owned(),
            cfg,
            inner: Mutex::new(Inner {
                segments,
                head: None,
                acked,
                next_id,
            }),
            _lock: lock,
        };
        let st = q.stats();
        opened.pending_records = st.pending_records;
        opened.pending_samples = st.pending_samples;
        Ok((q, opened))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one snapshot's request bodies (`(samples, payload)` each, timestamp `ts_ms`),
    /// fsyncs, then deletes the oldest segments while over the byte bound.
    pub fn append(&self, ts_ms: i64, batches: &[(u32, &[u8])]) -> io::Result<Appended> {
        let mut inner = self.lock();
        let mut buf = Vec::new();
        let mut created = false;
        for (samples, payload) in batches {
            let need_new = match (inner.head.is_some(), inner.segments.back()) {
                (true, Some(s)) => s.bytes >= self.cfg.segment_bytes,
                _ => true,
            };
            if need_new {
                if let Some(f) = inner.head.as_mut() {
                    f.write_all(&buf)?;
                    f.sync_data()?;
                    buf.clear();
                }
                let first_id = inner.next_id;
                let path = self.dir.join(seg_name(first_id));
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&path)?;
                inner.head = Some(f);
                inner.segments.push_back(Segment {
                    first_id,
                    path,
                    records: Vec::new(),
                    bytes: 0,
                });
                created = true;
            }
            let start = buf.len();
            encode_record(*samples, ts_ms, payload, &mut buf);
            let rec_len = (buf.len() - start) as u64;
            let seg = inner.segments.back_mut().expect("a head segment exists");
            seg.records.push(Meta {
                offset: seg.bytes,
                len: payload.len() as u32,
                samples: *samples,
                ts_ms,
            });
            seg.bytes += rec_len;
            inner.next_id += 1;
        }
        if let Some(f) = inner.head.as_mut() {
            f.write_all(&buf)?;
            f.sync_data()?;
        }
        if created {
            sync_dir(&self.dir)?;
        }
        self.enforce_bound(&mut inner)
    }

    fn enforce_bound(&self, inner: &mut Inner) -> io::Result<Appended> {
        let mut out = Appended::default();
        loop {
            let total: u64 = inner.segments.iter().map(|s| s.bytes).sum();
            if total <= self.cfg.max_bytes || inner.segments.is_empty() {
                return Ok(out);
            }
            let seg = inner.segments.pop_front().expect("not empty");
            if inner.segments.is_empty() {
                inner.head = None;
            }
            for (i, m) in seg.records.iter().enumerate() {
                if seg.first_id + i as u64 > inner.acked {
                    out.dropped_records += 1;
                    out.dropped_samples += u64::from(m.samples);
                }
            }
            fs::remove_file(&seg.path)?;
            if inner.acked < seg.end_id() - 1 {
                inner.acked = seg.end_id() - 1;
                self.write_acked(inner.acked)?;
            }
        }
    }

    fn write_acked(&self, id: u64) -> io::Result<()> {
        let tmp = self.dir.join("acked.tmp");
        fs::write(&tmp, format!("{id}\n"))?;
        fs::rename(&tmp, self.dir.join("acked"))
    }

    /// The oldest unsent record, if any. A record that no longer reads back intact (the disk
    /// changed under us) is skipped and returned as `Err` with its sample count, so the caller
    /// can count it.
    pub fn peek(&self) -> io::Result<Option<Result<Record, (u64, u32)>>> {
        let mut inner = self.lock();
        let mut id = inner.acked + 1;
        // A segment cut short at open (a damaged record) leaves a gap in the ids: skip it.
        if !inner
            .segments
            .iter()
            .any(|s| s.first_id <= id && id < s.end_id())
        {
            let Some(next) = inner.segments.iter().map(|s| s.first_id).find(|f| *f > id) else {
                return Ok(None);
            };
            inner.acked = next - 1;
            self.write_acked(inner.acked)?;
            id = next;
        }
        let Some(seg) = inner
            .segments
            .iter()
            .find(|s| s.first_id <= id && id < s.end_id())
        else {
            return Ok(None);
        };
        let m = seg.records[(id - seg.first_id) as usize];
        let mut f = File::open(&seg.path)?;
        f.seek(SeekFrom::Start(m.offset))?;
        let mut b = vec![0u8; HEADER + m.len as usize];
        if f.read_exact(&mut b).is_err() {
            return Ok(Some(Err((id, m.samples))));
        }
        match parse_header(&b) {
            Some((len, sum, samples, ts_ms))
                if len == m.len as usize && crc(samples, ts_ms, &b[HEADER..]) == sum =>
            {
                b.drain(..HEADER);
                Ok(Some(Ok(Record {
                    id,
                    samples,
                    ts_ms,
                    payload: b,
                })))
            }
            _ => Ok(Some(Err((id, m.samples)))),
        }
    }

    /// Marks every record up to `id` as delivered (or given up) and deletes finished segments.
    pub fn ack(&self, id: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if id <= inner.acked {
            return Ok(());
        }
        inner.acked = id;
        self.write_acked(id)?;
        while inner.segments.front().is_some_and(|s| s.end_id() <= id + 1) {
            let seg = inner.segments.pop_front().expect("checked");
            if inner.segments.is_empty() {
                // The head itself is done: the next append starts a new segment.
                inner.head = None;
            }
            fs::remove_file(&seg.path)?;
        }
        Ok(())
    }

    /// Sizes now.
    pub fn stats(&self) -> QueueStats {
        let inner = self.lock();
        let mut st = QueueStats {
            bytes: inner.segments.iter().map(|s| s.bytes).sum(),
            ..Default::default()
        };
        for seg in &inner.segments {
            for (i, m) in seg.records.iter().enumerate() {
                if seg.first_id + i as u64 > inner.acked {
                    st.pending_records += 1;
                    st.pending_samples += u64::from(m.samples);
                    st.oldest_pending_ms.get_or_insert(m.ts_ms);
                }
            }
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: u64, seg: u64) -> QueueConfig {
        QueueConfig {
            max_bytes: max,
            segment_bytes: seg,
        }
    }

    fn drain(q: &Queue) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(r) = q.peek().unwrap() {
            let r = r.expect("intact");
            q.ack(r.id).unwrap();
            out.push((r.samples, r.payload));
        }
        out
    }

    #[test]
    fn records_survive_reopen_in_order_and_acks_resume() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, o) = Queue::open(dir.path(), cfg(1 << 20, 100)).unwrap();
            assert_eq!(o, Opened::default());
            for i in 0..10u32 {
                let p = vec![i as u8; 40];
                q.append(1000 + i as i64, &[(i, &p)]).unwrap();
            }
            // Segments roll over at 100 bytes: 64 bytes per record, so 2 per segment.
            let segs = fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "seg")
                })
                .count();
            assert_eq!(segs, 5);
            let r = q.peek().unwrap().unwrap().unwrap();
            assert_eq!((r.id, r.samples, r.ts_ms), (1, 0, 1000));
            q.ack(3).unwrap();
            assert_eq!(q.stats().pending_records, 7);
            assert_eq!(q.stats().oldest_pending_ms, Some(1003));
        }
        let (q, o) = Queue::open(dir.path(), cfg(1 << 20, 100)).unwrap();
        assert_eq!(
            (o.pending_records, o.pending_samples),
            (7, 3 + 4 + 5 + 6 + 7 + 8 + 9)
        );
        let got = drain(&q);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7, 8, 9]
        );
        assert_eq!(got[0].1, vec![3u8; 40]);
        assert_eq!(q.stats(), QueueStats::default());
        // New records after a full drain continue the ids.
        q.append(5, &[(1, b"x")]).unwrap();
        let r = q.peek().unwrap().unwrap().unwrap();
        assert_eq!(r.id, 11);
    }

    #[test]
    fn corrupt_tail_is_cut_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = Queue::open(dir.path(), cfg(1 << 20, 1 << 20)).unwrap();
            q.append(1, &[(5, b"hello"), (6, b"world!")]).unwrap();
        }
        let seg = dir.path().join(seg_name(1));
        let len = fs::metadata(&seg).unwrap().len();
        // A crash mid-write: half a record of garbage after the good ones.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0x52, 0x57, 0x51, 0x31, 200, 0, 0, 0, 1, 2, 3])
            .unwrap();
        drop(f);
        let (q, o) = Queue::open(dir.path(), cfg(1 << 20, 1 << 20)).unwrap();
        assert_eq!(o.corrupt_bytes, 11);
        assert_eq!(o.pending_records, 2);
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            len,
            "truncated to the good part"
        );
        // A flipped payload byte in the second record: the first still reads.
        drop(q);
        let mut data = fs::read(&seg).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(&seg, &data).unwrap();
        let (q, o) = Queue::open(dir.path(), cfg(1 << 20, 1 << 20)).unwrap();
        assert_eq!(
            (o.pending_records, o.corrupt_bytes),
            (1, (HEADER + 6) as u64)
        );
        assert_eq!(drain(&q), vec![(5, b"hello".to_vec())]);
    }

    #[test]
    fn damage_in_an_older_segment_skips_to_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            // 64-byte records, 2 per segment: ids 1-2, 3-4, 5-6.
            let (q, _) = Queue::open(dir.path(), cfg(1 << 20, 100)).unwrap();
            for i in 0..6u32 {
                q.append(i as i64, &[(i, &[i as u8; 40])]).unwrap();
            }
        }
        let seg = dir.path().join(seg_name(3));
        let mut data = fs::read(&seg).unwrap();
        data[HEADER + 1] ^= 0xff; // record 3's payload
        fs::write(&seg, &data).unwrap();
        let (q, o) = Queue::open(dir.path(), cfg(1 << 20, 100)).unwrap();
        assert_eq!(o.corrupt_bytes, 128, "records 3 and 4 cut");
        let got: Vec<u32> = drain(&q).into_iter().map(|g| g.0).collect();
        assert_eq!(got, [0, 1, 4, 5], "ids 1, 2, then 5, 6: the gap is skipped");
    }

    #[test]
    fn bound_drops_oldest_segments_and_counts_their_samples() {
        let dir = tempfile::tempdir().unwrap();
        // 64-byte records, 2 per 128-byte segment, at most 256 bytes: 4 records kept.
        let (q, _) = Queue::open(dir.path(), cfg(256, 128)).unwrap();
        let mut dropped = 0;
        for i in 0..10u32 {
            let p = vec![i as u8; 40];
            dropped += q.append(i as i64, &[(10 + i, &p)]).unwrap().dropped_samples;
        }
        let st = q.stats();
        assert!(st.bytes <= 256, "{st:?}");
        assert_eq!(st.pending_records, 4);
        assert_eq!(dropped, (10..16).sum::<u64>(), "records 0..6 dropped");
        let got: Vec<u32> = drain(&q).into_iter().map(|g| g.0).collect();
        assert_eq!(got, [16, 17, 18, 19]);
    }

    #[test]
    fn a_second_collector_cannot_open_the_same_queue() {
        let dir = tempfile::tempdir().unwrap();
        let _q = Queue::open(dir.path(), QueueConfig::new(1 << 20)).unwrap();
        let err = Queue::open(dir.path(), QueueConfig::new(1 << 20)).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
