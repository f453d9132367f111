//! The collector's persisted state (`--state-dir`): merged counter and histogram totals, the
//! per-agent-instance dedupe state (`last_sequence`) and the admitted model names, so a
//! restarted collector continues its totals instead of starting from zero.
//!
//! The file `state.bin` is written atomically: a temporary file is written and fsynced, renamed
//! over the old one, and the directory is fsynced. It holds [`STATE_MAGIC`], the CRC-32 and
//! length of the payload, and the payload (`infertap.state.v1.CollectorState`, protobuf; see
//! `proto/proto/collector_state.proto`). A missing file starts empty; a damaged one, or one of
//! another format/schema version or aggregation mode, is logged, reported by
//! `infertap_collector_state_load{result}` and ignored (the collector starts empty, it does not
//! stop). A `lock` file held with `flock` keeps a second collector out of the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use infertap_proto::state_pb::CollectorState;
use prost::Message as _;

/// First bytes of a state file.
pub const STATE_MAGIC: &[u8; 8] = b"ITCSTAT\x01";
/// [`CollectorState::format_version`] this collector writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8;

/// Why a state file was not loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    /// Cut short, wrong magic, bad CRC or undecodable: `result="corrupt"`.
    Corrupt(String),
    /// Written by an incompatible collector: `result="version_mismatch"`.
    Mismatch(String),
}

impl LoadError {
    pub fn result(&self) -> &'static str {
        match self {
            LoadError::Corrupt(_) => "corrupt",
            LoadError::Mismatch(_) => "version_mismatch",
        }
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Corrupt(m) | LoadError::Mismatch(m) => f.write_str(m),
        }
    }
}

/// Serializes a state into the file format.
pub fn encode_file(state: &CollectorState) -> Vec<u8> {
    let payload = state.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Parses a state file and checks its versions against this collector's.
pub fn decode_file(b: &[u8], aggregate_by: &str) -> Result<CollectorState, LoadError> {
    if b.len() < HEADER || &b[..8] != STATE_MAGIC {
        return Err(LoadError::Corrupt(
            "not an infertap-collector state file (bad magic or too short)".into(),
        ));
    }
    let sum = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(b[12..20].try_into().unwrap_or_default());
    let payload = &b[HEADER..];
    if payload.len() as u64 != len {
        return Err(LoadError::Corrupt(format!(
            "payload is {} bytes, header says {len} (cut short?)",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != sum {
        return Err(LoadError::Corrupt("CRC mismatch".into()));
    }
    let st = CollectorState::decode(payload)
        .map_err(|e| LoadError::Corrupt(format!("undecodable: {e}")))?;
    if st.format_version != FORMAT_VERSION {
        return Err(LoadError::Mismatch(format!(
            "format version {} (this collector reads {FORMAT_VERSION})",
            st.format_version
        )));
    }
    if st.schema_version != infertap_proto::schema::SCHEMA_VERSION {
        return Err(LoadError::Mismatch(format!(
            "metric schema {} (this collector has {})",
            st.schema_version,
            infertap_proto::schema::SCHEMA_VERSION
        )));
    }
    if st.aggregate_by != aggregate_by {
        return Err(LoadError::Mismatch(format!(
            "written with --aggregate-by {}, now {aggregate_by}",
            st.aggregate_by
        )));
    }
    Ok(st)
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates and locks `dir`.
    pub fn open(dir: &Path) -> io::Result<StateDir> {
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
        Ok(StateDir {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.bin")
    }

    /// The saved state: `Ok(None)` when there is none yet.
    pub fn load(&self, aggregate_by: &str) -> Result<Option<CollectorState>, LoadError> {
        match fs::read(self.path()) {
            Ok(b) => decode_file(&b, aggregate_by).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LoadError::Corrupt(format!("unreadable: {e}"))),
        }
    }

    /// Writes `state` atomically (temp file, fsync, rename, fsync of the directory); returns
    /// the bytes written.
    pub fn write(&self, state: &CollectorState) -> io::Result<u64> {
        let bytes = encode_file(state);
        let tmp = self.dir.join("state.bin.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.path())?;
        File::open(&self.dir)?.sync_all()?;
        Ok(bytes.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infertap_proto::state_pb::AgentInstance;

    fn sample() -> CollectorState {
        CollectorState {
            format_version: FORMAT_VERSION,
            schema_version: infertap_proto::schema::SCHEMA_VERSION,
            written_unix_ns: 1,
            aggregate_by: "agent".into(),
            totals: None,
            instances: vec![AgentInstance {
                node: "n".into(),
                agent: "a".into(),
                instance: 9,
                last_sequence: 41,
                last_seen_unix_ns: 5,
            }],
            models: vec!["m".into()],
        }
    }

    #[test]
    fn roundtrip_and_every_kind_of_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert_eq!(sd.load("agent"), Ok(None));
        sd.write(&sample()).unwrap();
        assert_eq!(sd.load("agent"), Ok(Some(sample())));
        let good = fs::read(sd.path()).unwrap();
        // Cut short.
        fs::write(sd.path(), &good[..good.len() - 3]).unwrap();
        assert!(matches!(sd.load("agent"), Err(LoadError::Corrupt(_))));
        // One flipped bit.
        let mut bad = good.clone();
        bad[HEADER + 2] ^= 1;
        fs::write(sd.path(), &bad).unwrap();
        assert_eq!(sd.load("agent").unwrap_err().result(), "corrupt");
        // Garbage.
        fs::write(sd.path(), b"hello").unwrap();
        assert_eq!(sd.load("agent").unwrap_err().result(), "corrupt");
        // Other version / aggregation.
        let mut other = sample();
        other.format_version = 99;
        fs::write(sd.path(), encode_file(&other)).unwrap();
        assert_eq!(sd.load("agent").unwrap_err().result(), "version_mismatch");
        fs::write(sd.path(), &good).unwrap();
        assert_eq!(sd.load("node").unwrap_err().result(), "version_mismatch");
        // A second collector is kept out.
        assert!(StateDir::open(dir.path()).is_err());
    }
}
