//! pprof profiles (`perftools.profiles.Profile`, Google's `profile.proto`): building them from
//! stacks, gzip encoding and bounded decoding, validation, merging many into one and folding them
//! into flame-graph stacks.
//!
//! The agent builds one profile per [`ProfileKind`] per aggregation interval with a
//! [`ProfileBuilder`] and ships it gzipped in `IntervalReport.profiles`; the collector
//! [`decode`]s (bounded, validated), stores and [`merge`]s them. Each kind has fixed sample types
//! ([`ProfileKind::sample_types`]) so profiles from any agent merge.
//!
//! Frames:
//! - Python frames are Functions whose `name` is the qualified function name (`LLMEngine.step`)
//!   and whose `filename` is the source path (`.../vllm/engine/llm_engine.py`), with the line
//!   being executed, so `go tool pprof -filefunctions` shows `vllm/...` paths.
//! - Native frames carry `name` (demangled), `system_name` (the symbol as linked), file and line
//!   when debug info has them, the instruction address and the module's Mapping (file name and
//!   build id). Inlined calls at one address are several Lines on one Location, innermost first,
//!   as profile.proto specifies.

use std::collections::HashMap;
use std::fmt;

/// Hash maps of the builder and merger: foldhash (fast, randomly seeded per map) instead of
/// SipHash, which dominated merge time.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::io::{Read as _, Write as _};

use prost::Message as _;

/// Generated `perftools.profiles` messages.
#[allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
pub mod pb {
    tonic::include_proto!("perftools.profiles");
}

/// What a profile measures; each kind has fixed sample types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProfileKind {
    /// On-CPU timer samples.
    Cpu,
    /// Off-CPU (blocked or runnable-but-waiting) time by the stack that switched out.
    OffCpu,
    /// GPU time by launching call path.
    Gpu,
    /// Wall time inside slow token gaps of completed requests, on or off CPU, by stack.
    SlowTokens,
}

impl ProfileKind {
    pub const ALL: [ProfileKind; 4] = [
        ProfileKind::Cpu,
        ProfileKind::OffCpu,
        ProfileKind::Gpu,
        ProfileKind::SlowTokens,
    ];

    /// Short name used in URLs and labels: `cpu`, `offcpu`, `gpu`.
    pub fn name(self) -> &'static str {
        match self {
            ProfileKind::Cpu => "cpu",
            ProfileKind::OffCpu => "offcpu",
            ProfileKind::Gpu => "gpu",
            ProfileKind::SlowTokens => "slow_tokens",
        }
    }

    /// Parses [`ProfileKind::name`] (also `off_cpu`, `off-cpu`), case-insensitively.
    pub fn parse(s: &str) -> Option<ProfileKind> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Some(ProfileKind::Cpu),
            "offcpu" | "off_cpu" | "off-cpu" => Some(ProfileKind::OffCpu),
            "gpu" => Some(ProfileKind::Gpu),
            "slow_tokens" | "slow-tokens" | "slowtokens" => Some(ProfileKind::SlowTokens),
            _ => None,
        }
    }

    /// `(type, unit)` of each sample value. The first is always `samples/count` (pprof's
    /// convention for the event count), the second the time the kind measures in nanoseconds.
    pub fn sample_types(self) -> [(&'static str, &'static str); 2] {
        let time = match self {
            ProfileKind::Cpu => "cpu",
            ProfileKind::OffCpu => "off_cpu",
            ProfileKind::Gpu => "gpu",
            ProfileKind::SlowTokens => "wall",
        };
        [("samples", "count"), (time, "nanoseconds")]
    }

    /// Default `period_type` until [`ProfileBuilder::set_period`] says otherwise: CPU samples
    /// are one per `period` ns of CPU time; off-CPU and GPU samples are 1 in `period` switches
    /// or launches.
    pub fn default_period_type(self) -> (&'static str, &'static str) {
        match self {
            ProfileKind::Cpu => ("cpu", "nanoseconds"),
            ProfileKind::OffCpu => ("switches", "count"),
            ProfileKind::Gpu => ("launches", "count"),
            ProfileKind::SlowTokens => ("wall", "nanoseconds"),
        }
    }

    pub fn from_pb(t: crate::pb::ProfileType) -> Option<ProfileKind> {
        match t {
            crate::pb::ProfileType::Cpu => Some(ProfileKind::Cpu),
            crate::pb::ProfileType::OffCpu => Some(ProfileKind::OffCpu),
            crate::pb::ProfileType::Gpu => Some(ProfileKind::Gpu),
            crate::pb::ProfileType::SlowTokens => Some(ProfileKind::SlowTokens),
            crate::pb::ProfileType::Unspecified => None,
        }
    }

    pub fn to_pb(self) -> crate::pb::ProfileType {
        match self {
            ProfileKind::Cpu => crate::pb::ProfileType::Cpu,
            ProfileKind::OffCpu => crate::pb::ProfileType::OffCpu,
            ProfileKind::Gpu => crate::pb::ProfileType::Gpu,
            ProfileKind::SlowTokens => crate::pb::ProfileType::SlowTokens,
        }
    }

    /// Whether `p`'s sample types are exactly this kind's.
    pub fn matches(self, p: &pb::Profile) -> bool {
        let want = self.sample_types();
        p.sample_type.len() == want.len()
            && p.sample_type.iter().zip(want).all(|(vt, (ty, unit))| {
                str_at(p, vt.r#type) == Some(ty) && str_at(p, vt.unit) == Some(unit)
            })
    }
}

impl fmt::Display for ProfileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a profile could not be decoded, validated or merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PprofError {
    /// The gzip stream is corrupt or truncated.
    Gzip(String),
    /// Decompressed data would exceed the caller's limit (bytes).
    TooLarge { limit: usize },
    /// Not a protobuf `Profile`.
    Protobuf(String),
    /// Decoded, but internally inconsistent (a dangling id or string index, ...).
    Invalid(String),
    /// Sample types differ from the profiles merged before (or from the expected kind).
    SampleTypes { got: Vec<String>, want: Vec<String> },
    /// A sample with a different number of values than sample types.
    ValueCount { got: usize, want: usize },
}

impl PprofError {
    /// Short, bounded reason for a rejection counter label.
    pub fn reason(&self) -> &'static str {
        match self {
            PprofError::Gzip(_) => "gzip",
            PprofError::TooLarge { .. } => "too_large",
            PprofError::Protobuf(_) => "protobuf",
            PprofError::Invalid(_) => "invalid",
            PprofError::SampleTypes { .. } => "sample_types",
            PprofError::ValueCount { .. } => "value_count",
        }
    }
}

impl fmt::Display for PprofError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PprofError::Gzip(e) => write!(f, "bad gzip stream: {e}"),
            PprofError::TooLarge { limit } => {
                write!(f, "profile larger than {limit} bytes decompressed")
            }
            PprofError::Protobuf(e) => write!(f, "not a pprof Profile: {e}"),
            PprofError::Invalid(e) => write!(f, "inconsistent profile: {e}"),
            PprofError::SampleTypes { got, want } => {
                write!(f, "sample types {got:?}, expected {want:?}")
            }
            PprofError::ValueCount { got, want } => {
                write!(
                    f,
                    "sample with {got} values, profile has {want} sample types"
                )
            }
        }
    }
}

impl std::error::Error for PprofError {}

/// `string_table[i]`, if `i` is a valid index.
pub fn str_at(p: &pb::Profile, i: i64) -> Option<&str> {
    usize::try_from(i)
        .ok()
        .and_then(|i| p.string_table.get(i))
        .map(String::as_str)
}

fn sample_type_names(p: &pb::Profile) -> Vec<String> {
    p.sample_type
        .iter()
        .map(|vt| {
            format!(
                "{}/{}",
                str_at(p, vt.r#type).unwrap_or("?"),
                str_at(p, vt.unit).unwrap_or("?")
            )
        })
        .collect()
}

/// Serializes and gzips a profile (what `go tool pprof` and Pyroscope read).
pub fn encode_gzip(p: &pb::Profile) -> Vec<u8> {
    let raw = p.encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        flate2::Compression::new(1),
    );
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(&raw);
    gz.finish().unwrap_or_default()
}

/// Decodes a gzipped (or plain) serialized profile, decompressing at most `max_decoded` bytes,
/// and [`validate`]s it. Never panics on garbage.
pub fn decode(data: &[u8], max_decoded: usize) -> Result<pb::Profile, PprofError> {
    let raw: std::borrow::Cow<'_, [u8]> = if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let mut rd = flate2::read::MultiGzDecoder::new(data).take(max_decoded as u64 + 1);
        rd.read_to_end(&mut out)
            .map_err(|e| PprofError::Gzip(e.to_string()))?;
        if out.len() > max_decoded {
            return Err(PprofError::TooLarge { limit: max_decoded });
        }
        out.into()
    } else {
        if data.len() > max_decoded {
            return Err(PprofError::TooLarge { limit: max_decoded });
        }
        data.into()
    };
    let p = pb::Profile::decode(&*raw).map_err(|e| PprofError::Protobuf(e.to_string()))?;
    validate(&p)?;
    Ok(p)
}

/// Checks what readers rely on: `string_table[0] == ""`, every string index in range, ids
/// nonzero and unique, every referenced mapping/location/function present, every sample with
/// one value per sample type.
pub fn validate(p: &pb::Profile) -> Result<(), PprofError> {
    let bad = |m: String| Err(PprofError::Invalid(m));
    if p.string_table.first().map(String::as_str) != Some("") {
        return bad("string_table[0] must be the empty string".into());
    }
    let n = p.string_table.len() as i64;
    let s = |i: i64, what: &str| -> Result<(), PprofError> {
        if (0..n).contains(&i) {
            Ok(())
        } else {
            Err(PprofError::Invalid(format!(
                "{what} string index {i} outside a table of {n}"
            )))
        }
    };
    if p.sample_type.is_empty() {
        return bad("no sample types".into());
    }
    for vt in p.sample_type.iter().chain(&p.period_type) {
        s(vt.r#type, "value type")?;
        s(vt.unit, "value unit")?;
    }
    for &i in [
        p.drop_frames,
        p.keep_frames,
        p.default_sample_type,
        p.doc_url,
    ]
    .iter()
    .chain(&p.comment)
    {
        s(i, "profile")?;
    }
    let mut mappings: Map<u64, ()> =
        Map::with_capacity_and_hasher(p.mapping.len(), Default::default());
    for m in &p.mapping {
        if m.id == 0 || mappings.insert(m.id, ()).is_some() {
            return bad(format!("mapping id {} zero or repeated", m.id));
        }
        s(m.filename, "mapping filename")?;
        s(m.build_id, "mapping build id")?;
    }
    let mut functions: Map<u64, ()> =
        Map::with_capacity_and_hasher(p.function.len(), Default::default());
    for f in &p.function {
        if f.id == 0 || functions.insert(f.id, ()).is_some() {
            return bad(format!("function id {} zero or repeated", f.id));
        }
        s(f.name, "function name")?;
        s(f.system_name, "function system name")?;
        s(f.filename, "function filename")?;
    }
    let mut locations: Map<u64, ()> =
        Map::with_capacity_and_hasher(p.location.len(), Default::default());
    for l in &p.location {
        if l.id == 0 || locations.insert(l.id, ()).is_some() {
            return bad(format!("location id {} zero or repeated", l.id));
        }
        if l.mapping_id != 0 && !mappings.contains_key(&l.mapping_id) {
            return bad(format!(
                "location {} refers to missing mapping {}",
                l.id, l.mapping_id
            ));
        }
        for line in &l.line {
            if !functions.contains_key(&line.function_id) {
                return bad(format!(
                    "location {} refers to missing function {}",
                    l.id, line.function_id
                ));
            }
        }
    }
    let want = p.sample_type.len();
    for sample in &p.sample {
        if sample.value.len() != want {
            return Err(PprofError::ValueCount {
                got: sample.value.len(),
                want,
            });
        }
        for id in &sample.location_id {
            if !locations.contains_key(id) {
                return bad(format!("sample refers to missing location {id}"));
            }
        }
        for l in &sample.label {
            s(l.key, "label key")?;
            s(l.str, "label value")?;
            s(l.num_unit, "label unit")?;
        }
    }
    Ok(())
}

/// Sum of sample value `index` over all samples (saturating).
pub fn total(p: &pb::Profile, index: usize) -> i64 {
    p.sample
        .iter()
        .filter_map(|s| s.value.get(index))
        .fold(0i64, |a, v| a.saturating_add(*v))
}

/// Interns strings: index 0 is always `""`.
#[derive(Debug, Clone)]
struct StringTable {
    index: Map<String, i64>,
    strings: Vec<String>,
}

impl Default for StringTable {
    fn default() -> Self {
        StringTable {
            index: Map::from_iter([(String::new(), 0)]),
            strings: vec![String::new()],
        }
    }
}

impl StringTable {
    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.index.insert(s.to_owned(), i);
        self.strings.push(s.to_owned());
        i
    }
}

/// Handle of a Mapping in one builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MappingId(u64);

/// Handle of a Location in one builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocationId(u64);

/// A loaded module (executable, shared library, `[vdso]`, the kernel).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mapping<'a> {
    pub memory_start: u64,
    pub memory_limit: u64,
    pub file_offset: u64,
    /// Path of the object as the process mapped it.
    pub filename: &'a str,
    /// GNU build id in hex (empty when unknown).
    pub build_id: &'a str,
    pub has_functions: bool,
    pub has_filenames: bool,
    pub has_line_numbers: bool,
    pub has_inline_frames: bool,
}

/// One function at one source line: a Python frame, a native function, or one level of an
/// inlined call chain.
#[derive(Clone, Copy, Debug, Default)]
pub struct Line<'a> {
    /// Human-readable name: the Python qualified name, or the demangled native name.
    pub name: &'a str,
    /// The name as the system knows it (the linker symbol); empty means the same as `name`.
    pub system_name: &'a str,
    /// Source path (empty when unknown).
    pub filename: &'a str,
    /// First line of the function (0 when unknown).
    pub start_line: i64,
    /// Line being executed (0 when unknown).
    pub line: i64,
}

/// Value of a sample label.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LabelValue<'a> {
    Str(&'a str),
    /// A number with an optional unit (`""`, `"bytes"`, `"nanoseconds"`, ...).
    Num(i64, &'a str),
}

/// A label on a sample (thread name, pid, request id, ...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleLabel<'a> {
    pub key: &'a str,
    pub value: LabelValue<'a>,
}

impl<'a> SampleLabel<'a> {
    pub fn str(key: &'a str, value: &'a str) -> Self {
        SampleLabel {
            key,
            value: LabelValue::Str(value),
        }
    }

    pub fn num(key: &'a str, value: i64, unit: &'a str) -> Self {
        SampleLabel {
            key,
            value: LabelValue::Num(value, unit),
        }
    }
}

type FunctionKey = (i64, i64, i64, i64);
type LocationKey = (u64, u64, Vec<(u64, i64, i64)>, bool);
type MappingKey = (u64, u64, u64, i64, i64);
/// Label as (key, str, num, num_unit) string indices / number.
type LabelKey = (i64, i64, i64, i64);
type SampleKey = (Vec<u64>, Vec<LabelKey>);

/// Builds a profile: interns strings and dedupes Mappings, Functions, Locations and samples
/// (an identical stack with identical labels adds its values to the existing sample).
#[derive(Debug, Clone)]
pub struct ProfileBuilder {
    kind: Option<ProfileKind>,
    strings: StringTable,
    profile: pb::Profile,
    mappings: Map<MappingKey, u64>,
    functions: Map<FunctionKey, u64>,
    locations: Map<LocationKey, u64>,
    samples: Map<SampleKey, usize>,
}

/// Why [`ProfileBuilder::add_sample`] refused a sample (a caller bug, never data-dependent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// Not one value per sample type.
    ValueCount { got: usize, want: usize },
    /// A location id that this builder did not hand out.
    UnknownLocation(u64),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::ValueCount { got, want } => {
                write!(f, "{got} values for {want} sample types")
            }
            BuildError::UnknownLocation(id) => write!(f, "location {id} not from this builder"),
        }
    }
}

impl std::error::Error for BuildError {}

impl ProfileBuilder {
    /// A builder for one [`ProfileKind`]: its sample types, default period type, and the time
    /// value (nanoseconds) as the default sample type.
    pub fn new(kind: ProfileKind) -> Self {
        let mut b = Self::with_sample_types(&kind.sample_types());
        b.kind = Some(kind);
        let (ty, unit) = kind.default_period_type();
        b.set_period(ty, unit, 0);
        b
    }

    /// A builder with arbitrary sample types (`(type, unit)`); the last is the default.
    pub fn with_sample_types(sample_types: &[(&str, &str)]) -> Self {
        let mut b = ProfileBuilder {
            kind: None,
            strings: StringTable::default(),
            profile: pb::Profile::default(),
            mappings: Map::default(),
            functions: Map::default(),
            locations: Map::default(),
            samples: Map::default(),
        };
        for (ty, unit) in sample_types {
            let vt = pb::ValueType {
                r#type: b.strings.intern(ty),
                unit: b.strings.intern(unit),
            };
            b.profile.sample_type.push(vt);
        }
        if let Some((ty, _)) = sample_types.last() {
            b.profile.default_sample_type = b.strings.intern(ty);
        }
        b
    }

    /// Collection start and duration (`time_nanos`, `duration_nanos`), from unix ns.
    pub fn set_time(&mut self, start_unix_ns: u64, end_unix_ns: u64) {
        self.profile.time_nanos = i64::try_from(start_unix_ns).unwrap_or(i64::MAX);
        self.profile.duration_nanos =
            i64::try_from(end_unix_ns.saturating_sub(start_unix_ns)).unwrap_or(i64::MAX);
    }

    /// `period_type` and `period`: e.g. `("cpu", "nanoseconds", 10_000_000)` for 100 Hz.
    pub fn set_period(&mut self, ty: &str, unit: &str, period: i64) {
        self.profile.period_type = Some(pb::ValueType {
            r#type: self.strings.intern(ty),
            unit: self.strings.intern(unit),
        });
        self.profile.period = period;
    }

    /// Free-form comment shown by `go tool pprof -comments`.
    pub fn add_comment(&mut self, comment: &str) {
        let i = self.strings.intern(comment);
        if !self.profile.comment.contains(&i) {
            self.profile.comment.push(i);
        }
    }

    /// The Mapping of a module, created on first use.
    pub fn mapping(&mut self, m: &Mapping<'_>) -> MappingId {
        let filename = self.strings.intern(m.filename);
        let build_id = self.strings.intern(m.build_id);
        let key = (
            m.memory_start,
            m.memory_limit,
            m.file_offset,
            filename,
            build_id,
        );
        let next = self.profile.mapping.len() as u64 + 1;
        let id = *self.mappings.entry(key).or_insert(next);
        if id == next {
            self.profile.mapping.push(pb::Mapping {
                id,
                memory_start: m.memory_start,
                memory_limit: m.memory_limit,
                file_offset: m.file_offset,
                filename,
                build_id,
                has_functions: m.has_functions,
                has_filenames: m.has_filenames,
                has_line_numbers: m.has_line_numbers,
                has_inline_frames: m.has_inline_frames,
            });
        }
        MappingId(id)
    }

    fn function_raw(&mut self, key: FunctionKey) -> u64 {
        let next = self.profile.function.len() as u64 + 1;
        let id = *self.functions.entry(key).or_insert(next);
        if id == next {
            self.profile.function.push(pb::Function {
                id,
                name: key.0,
                system_name: key.1,
                filename: key.2,
                start_line: key.3,
            });
        }
        id
    }

    fn function(&mut self, l: &Line<'_>) -> u64 {
        let name = self.strings.intern(l.name);
        let system_name = if l.system_name.is_empty() {
            name
        } else {
            self.strings.intern(l.system_name)
        };
        let filename = self.strings.intern(l.filename);
        self.function_raw((name, system_name, filename, l.start_line))
    }

    fn location_raw(&mut self, key: LocationKey) -> u64 {
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(pb::Location {
            id,
            mapping_id: key.0,
            address: key.1,
            line: key
                .2
                .iter()
                .map(|&(function_id, line, column)| pb::Line {
                    function_id,
                    line,
                    column,
                })
                .collect(),
            is_folded: key.3,
        });
        self.locations.insert(key, id);
        id
    }

    /// A Python frame: `qualname` (e.g. `LLMEngine.step`) in `filename` (the code object's
    /// `co_filename`), function starting at `first_line`, executing `line`.
    pub fn python_frame(
        &mut self,
        qualname: &str,
        filename: &str,
        first_line: i64,
        line: i64,
    ) -> LocationId {
        let f = self.function(&Line {
            name: qualname,
            system_name: "",
            filename,
            start_line: first_line,
            line,
        });
        LocationId(self.location_raw((0, 0, vec![(f, line, 0)], false)))
    }

    /// A Python frame whose display name differs from its qualified name (`system_name`),
    /// e.g. `[module]` for `<module>`, which pprof tools would otherwise strip as a template.
    pub fn python_frame_named(
        &mut self,
        name: &str,
        system_name: &str,
        filename: &str,
        first_line: i64,
        line: i64,
    ) -> LocationId {
        let f = self.function(&Line {
            name,
            system_name,
            filename,
            start_line: first_line,
            line,
        });
        LocationId(self.location_raw((0, 0, vec![(f, line, 0)], false)))
    }

    /// A native frame at `address` in `mapping`. `lines` are the functions at that address,
    /// innermost (most deeply inlined) first and the function the code belongs to last; empty
    /// for an unsymbolized address.
    pub fn native_frame(
        &mut self,
        mapping: Option<MappingId>,
        address: u64,
        lines: &[Line<'_>],
    ) -> LocationId {
        let lines = lines
            .iter()
            .map(|l| (self.function(l), l.line, 0))
            .collect();
        LocationId(self.location_raw((mapping.map_or(0, |m| m.0), address, lines, false)))
    }

    fn label_key(&mut self, l: &SampleLabel<'_>) -> LabelKey {
        let key = self.strings.intern(l.key);
        match l.value {
            LabelValue::Str(v) => (key, self.strings.intern(v), 0, 0),
            LabelValue::Num(n, unit) => (key, 0, n, self.strings.intern(unit)),
        }
    }

    /// Adds a sample: `stack` leaf first, one value per sample type. Identical stacks with
    /// identical labels (in any order) are summed into one sample.
    pub fn add_sample(
        &mut self,
        stack: &[LocationId],
        values: &[i64],
        labels: &[SampleLabel<'_>],
    ) -> Result<(), BuildError> {
        let want = self.profile.sample_type.len();
        if values.len() != want {
            return Err(BuildError::ValueCount {
                got: values.len(),
                want,
            });
        }
        let n = self.profile.location.len() as u64;
        if let Some(bad) = stack.iter().find(|l| l.0 == 0 || l.0 > n) {
            return Err(BuildError::UnknownLocation(bad.0));
        }
        let labels: Vec<LabelKey> = labels.iter().map(|l| self.label_key(l)).collect();
        self.add_sample_keyed(stack.iter().map(|l| l.0).collect(), labels, values);
        Ok(())
    }

    fn add_sample_keyed(&mut self, locations: Vec<u64>, mut labels: Vec<LabelKey>, values: &[i64]) {
        labels.sort_unstable();
        let key = (locations, labels);
        if let Some(&i) = self.samples.get(&key) {
            for (a, v) in self.profile.sample[i].value.iter_mut().zip(values) {
                *a = a.saturating_add(*v);
            }
            return;
        }
        self.profile.sample.push(pb::Sample {
            location_id: key.0.clone(),
            value: values.to_vec(),
            label: key
                .1
                .iter()
                .map(|&(key, str, num, num_unit)| pb::Label {
                    key,
                    str,
                    num,
                    num_unit,
                })
                .collect(),
        });
        self.samples.insert(key, self.profile.sample.len() - 1);
    }

    /// Sum of the first sample value (samples/count for every [`ProfileKind`]).
    pub fn sample_count(&self) -> u64 {
        self.profile
            .sample
            .iter()
            .filter_map(|s| s.value.first())
            .fold(0u64, |a, v| a.saturating_add((*v).max(0) as u64))
    }

    /// Distinct samples so far.
    pub fn len(&self) -> usize {
        self.profile.sample.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profile.sample.is_empty()
    }

    /// The finished profile.
    pub fn build(mut self) -> pb::Profile {
        self.profile.string_table = self.strings.strings;
        self.profile
    }

    /// The finished profile, gzipped, with its [`ProfileBuilder::sample_count`].
    pub fn encode_gzip(self) -> (Vec<u8>, u64) {
        let count = self.sample_count();
        (encode_gzip(&self.build()), count)
    }

    /// The finished profile as it travels on an `IntervalReport` (type, time range from
    /// [`ProfileBuilder::set_time`], gzipped bytes, sample count): what the agent hands to the
    /// gRPC exporter's `attach_profile`. `None` for a builder made with
    /// [`ProfileBuilder::with_sample_types`] (no [`ProfileKind`]).
    pub fn into_profile_data(self) -> Option<crate::pb::ProfileData> {
        let kind = self.kind?;
        let start = self.profile.time_nanos.max(0) as u64;
        let end = start.saturating_add(self.profile.duration_nanos.max(0) as u64);
        let (bytes, sample_count) = self.encode_gzip();
        Some(crate::pb::ProfileData {
            r#type: kind.to_pb() as i32,
            start_unix_ns: start,
            end_unix_ns: end,
            pprof: bytes.into(),
            sample_count,
        })
    }
}

/// Keeps only samples carrying every `(key, value)` string label given (an empty filter keeps
/// all). A numeric label matches when `value` is its decimal number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelFilter {
    pub labels: Vec<(String, String)>,
}

impl LabelFilter {
    pub fn new(labels: Vec<(String, String)>) -> Self {
        LabelFilter { labels }
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn matches(&self, p: &pb::Profile, s: &pb::Sample) -> bool {
        self.labels.iter().all(|(k, v)| {
            s.label.iter().any(|l| {
                str_at(p, l.key) == Some(k.as_str())
                    && if l.str != 0 {
                        str_at(p, l.str) == Some(v.as_str())
                    } else {
                        v.parse::<i64>().ok() == Some(l.num)
                    }
            })
        })
    }
}

/// Merges profiles of the same sample types into one: every table is remapped into one string
/// table, identical Mappings/Functions/Locations are shared, and samples with an identical stack
/// and identical labels are summed. `time_nanos`..end covers all inputs, `period` is the largest.
#[derive(Debug)]
pub struct Merger {
    builder: Option<ProfileBuilder>,
    sample_types: Vec<String>,
    filter: LabelFilter,
    start: Option<i64>,
    end: i64,
    frames: Option<(String, String)>,
    merged: usize,
}

impl Merger {
    /// A merger keeping only samples that pass `filter` (`LabelFilter::default()` keeps all).
    pub fn new(filter: LabelFilter) -> Self {
        Merger {
            builder: None,
            sample_types: Vec::new(),
            filter,
            start: None,
            end: 0,
            frames: None,
            merged: 0,
        }
    }

    /// Profiles added so far.
    pub fn merged(&self) -> usize {
        self.merged
    }

    /// Adds a (validated) profile. Fails, leaving the merger unchanged, when its sample types
    /// differ from the first profile's or it is inconsistent.
    pub fn add(&mut self, p: &pb::Profile) -> Result<(), PprofError> {
        validate(p)?;
        self.add_valid(p)
    }

    /// [`decode`]s (which validates) and adds a gzipped profile.
    pub fn add_encoded(&mut self, data: &[u8], max_decoded: usize) -> Result<(), PprofError> {
        let p = decode(data, max_decoded)?;
        self.add_valid(&p)
    }

    fn add_valid(&mut self, p: &pb::Profile) -> Result<(), PprofError> {
        let types = sample_type_names(p);
        let b = match &mut self.builder {
            Some(b) => {
                if types != self.sample_types {
                    return Err(PprofError::SampleTypes {
                        got: types,
                        want: self.sample_types.clone(),
                    });
                }
                b
            }
            None => {
                let names: Vec<(&str, &str)> = p
                    .sample_type
                    .iter()
                    .map(|vt| {
                        (
                            str_at(p, vt.r#type).unwrap_or(""),
                            str_at(p, vt.unit).unwrap_or(""),
                        )
                    })
                    .collect();
                let mut b = ProfileBuilder::with_sample_types(&names);
                if p.default_sample_type != 0 {
                    b.profile.default_sample_type = b
                        .strings
                        .intern(str_at(p, p.default_sample_type).unwrap_or(""));
                }
                if p.doc_url != 0 {
                    b.profile.doc_url = b.strings.intern(str_at(p, p.doc_url).unwrap_or(""));
                }
                self.sample_types = types;
                self.frames = Some((
                    str_at(p, p.drop_frames).unwrap_or("").to_owned(),
                    str_at(p, p.keep_frames).unwrap_or("").to_owned(),
                ));
                self.builder.insert(b)
            }
        };
        // String index of this profile -> merged index, interned on first use.
        let mut strs: Vec<Option<i64>> = vec![None; p.string_table.len()];
        let mut s = |b: &mut ProfileBuilder, i: i64| -> i64 {
            let i = i as usize; // validated: in range
            *strs[i].get_or_insert_with(|| b.strings.intern(&p.string_table[i]))
        };
        if let Some(pt) = &p.period_type {
            if b.profile.period_type.is_none() {
                b.profile.period_type = Some(pb::ValueType {
                    r#type: s(b, pt.r#type),
                    unit: s(b, pt.unit),
                });
            }
        }
        b.profile.period = b.profile.period.max(p.period);
        for &c in &p.comment {
            let c = s(b, c);
            if !b.profile.comment.contains(&c) {
                b.profile.comment.push(c);
            }
        }
        if let Some((drop, keep)) = &self.frames {
            if str_at(p, p.drop_frames).unwrap_or("") != drop
                || str_at(p, p.keep_frames).unwrap_or("") != keep
            {
                self.frames = Some((String::new(), String::new()));
            }
        }
        let mut mappings: Map<u64, u64> =
            Map::with_capacity_and_hasher(p.mapping.len(), Default::default());
        for m in &p.mapping {
            let key = (
                m.memory_start,
                m.memory_limit,
                m.file_offset,
                s(b, m.filename),
                s(b, m.build_id),
            );
            let next = b.profile.mapping.len() as u64 + 1;
            let id = *b.mappings.entry(key).or_insert(next);
            if id == next {
                b.profile.mapping.push(pb::Mapping {
                    id,
                    filename: key.3,
                    build_id: key.4,
                    ..*m
                });
            } else {
                // The same module symbolized in one profile and not another: keep the best.
                let mine = &mut b.profile.mapping[id as usize - 1];
                mine.has_functions |= m.has_functions;
                mine.has_filenames |= m.has_filenames;
                mine.has_line_numbers |= m.has_line_numbers;
                mine.has_inline_frames |= m.has_inline_frames;
            }
            mappings.insert(m.id, id);
        }
        let mut functions: Map<u64, u64> =
            Map::with_capacity_and_hasher(p.function.len(), Default::default());
        for f in &p.function {
            let key = (
                s(b, f.name),
                s(b, f.system_name),
                s(b, f.filename),
                f.start_line,
            );
            functions.insert(f.id, b.function_raw(key));
        }
        let mut locations: Map<u64, u64> =
            Map::with_capacity_and_hasher(p.location.len(), Default::default());
        for l in &p.location {
            let key = (
                if l.mapping_id == 0 {
                    0
                } else {
                    mappings[&l.mapping_id]
                },
                l.address,
                l.line
                    .iter()
                    .map(|line| (functions[&line.function_id], line.line, line.column))
                    .collect(),
                l.is_folded,
            );
            locations.insert(l.id, b.location_raw(key));
        }
        for sample in &p.sample {
            if !self.filter.is_empty() && !self.filter.matches(p, sample) {
                continue;
            }
            let locs = sample.location_id.iter().map(|id| locations[id]).collect();
            let labels = sample
                .label
                .iter()
                .map(|l| {
                    (
                        s(b, l.key),
                        s(b, l.str),
                        l.num,
                        if l.num_unit == 0 { 0 } else { s(b, l.num_unit) },
                    )
                })
                .collect();
            b.add_sample_keyed(locs, labels, &sample.value);
        }
        if p.time_nanos != 0 {
            self.start = Some(self.start.map_or(p.time_nanos, |s| s.min(p.time_nanos)));
            self.end = self
                .end
                .max(p.time_nanos.saturating_add(p.duration_nanos.max(0)));
        }
        self.merged += 1;
        Ok(())
    }

    /// The merged profile; `None` when nothing was added.
    pub fn finish(self) -> Option<pb::Profile> {
        let mut b = self.builder?;
        if let Some(start) = self.start {
            b.profile.time_nanos = start;
            b.profile.duration_nanos = self.end - start;
        }
        if let Some((drop, keep)) = &self.frames {
            if !drop.is_empty() {
                b.profile.drop_frames = b.strings.intern(drop);
            }
            if !keep.is_empty() {
                b.profile.keep_frames = b.strings.intern(keep);
            }
        }
        Some(b.build())
    }
}

/// Merges `profiles` (see [`Merger`]); `None` for an empty input.
pub fn merge<'a>(
    profiles: impl IntoIterator<Item = &'a pb::Profile>,
    filter: &LabelFilter,
) -> Result<Option<pb::Profile>, PprofError> {
    let mut m = Merger::new(filter.clone());
    for p in profiles {
        m.add(p)?;
    }
    Ok(m.finish())
}

/// An empty (no samples) but valid profile of `kind`: what a query over a range without
/// profiles answers.
pub fn empty(kind: ProfileKind, start_unix_ns: u64, end_unix_ns: u64) -> pb::Profile {
    let mut b = ProfileBuilder::new(kind);
    b.set_time(start_unix_ns, end_unix_ns);
    b.build()
}

/// Name of a location's frame for folded stacks: its functions (outermost first, `;`
/// between inlined levels), or `module+0xoffset` when unsymbolized.
fn frame_names(
    p: &pb::Profile,
    l: &pb::Location,
    out: &mut Vec<String>,
    funcs: &HashMap<u64, &pb::Function>,
    maps: &HashMap<u64, &pb::Mapping>,
) {
    if l.line.is_empty() {
        let name = match maps.get(&l.mapping_id) {
            Some(m) => {
                let file = str_at(p, m.filename).unwrap_or("");
                let base = file.rsplit('/').next().unwrap_or(file);
                let off = l
                    .address
                    .wrapping_sub(m.memory_start)
                    .wrapping_add(m.file_offset);
                format!("{base}+{off:#x}")
            }
            None => format!("{:#x}", l.address),
        };
        out.push(name);
        return;
    }
    for line in l.line.iter().rev() {
        let name = funcs
            .get(&line.function_id)
            .and_then(|f| str_at(p, f.name))
            .unwrap_or("?");
        out.push(sanitize_frame(name));
    }
}

/// Folded stacks cannot hold `;` (the separator) or line breaks in a frame.
fn sanitize_frame(name: &str) -> String {
    if name.is_empty() {
        return "?".into();
    }
    name.chars()
        .map(|c| match c {
            ';' => ':',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect()
}

/// The profile as folded stacks (`root;...;leaf` → sum of sample value `index`), sorted by
/// stack, samples with a non-positive value left out: the input of flame graph renderers.
pub fn fold(p: &pb::Profile, index: usize) -> Vec<(String, i64)> {
    let funcs: HashMap<u64, &pb::Function> = p.function.iter().map(|f| (f.id, f)).collect();
    let maps: HashMap<u64, &pb::Mapping> = p.mapping.iter().map(|m| (m.id, m)).collect();
    let locs: HashMap<u64, &pb::Location> = p.location.iter().map(|l| (l.id, l)).collect();
    let mut names: HashMap<u64, Vec<String>> = HashMap::new();
    let mut folded: std::collections::BTreeMap<String, i64> = Default::default();
    for s in &p.sample {
        let v = s.value.get(index).copied().unwrap_or(0);
        if v <= 0 {
            continue;
        }
        let mut stack = String::new();
        for id in s.location_id.iter().rev() {
            let frames = names.entry(*id).or_insert_with(|| {
                let mut out = Vec::new();
                match locs.get(id) {
                    Some(l) => frame_names(p, l, &mut out, &funcs, &maps),
                    None => out.push("?".into()),
                }
                out
            });
            for f in frames.iter() {
                if !stack.is_empty() {
                    stack.push(';');
                }
                stack.push_str(f);
            }
        }
        if stack.is_empty() {
            stack.push_str("(no frames)");
        }
        let e = folded.entry(stack).or_insert(0);
        *e = e.saturating_add(v);
    }
    folded.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A stack frame independent of ids: (mapping file, address, [(function, file, line)]).
    type Frame = (String, u64, Vec<(String, String, i64)>);
    /// The meaning of a profile, independent of id assignment and table order.
    type Canonical = BTreeMap<(Vec<Frame>, Vec<(String, String, i64)>), Vec<i64>>;

    fn canonical(p: &pb::Profile) -> Canonical {
        let funcs: HashMap<u64, &pb::Function> = p.function.iter().map(|f| (f.id, f)).collect();
        let maps: HashMap<u64, &pb::Mapping> = p.mapping.iter().map(|m| (m.id, m)).collect();
        let locs: HashMap<u64, &pb::Location> = p.location.iter().map(|l| (l.id, l)).collect();
        let st = |i| str_at(p, i).unwrap().to_owned();
        let mut out = Canonical::new();
        for s in &p.sample {
            let stack = s
                .location_id
                .iter()
                .map(|id| {
                    let l = locs[id];
                    let file = maps
                        .get(&l.mapping_id)
                        .map_or(String::new(), |m| st(m.filename));
                    let lines = l
                        .line
                        .iter()
                        .map(|ln| {
                            let f = funcs[&ln.function_id];
                            (st(f.name), st(f.filename), ln.line)
                        })
                        .collect();
                    (file, l.address, lines)
                })
                .collect();
            let mut labels: Vec<_> = s
                .label
                .iter()
                .map(|l| (st(l.key), st(l.str), l.num))
                .collect();
            labels.sort();
            let e = out
                .entry((stack, labels))
                .or_insert_with(|| vec![0; s.value.len()]);
            for (a, v) in e.iter_mut().zip(&s.value) {
                *a += v;
            }
        }
        out
    }

    /// Builds a CPU profile from (stack of frame numbers leaf first, samples, thread label).
    fn build(samples: &[(Vec<u8>, i64, u8)], start_ns: u64) -> pb::Profile {
        let mut b = ProfileBuilder::new(ProfileKind::Cpu);
        b.set_time(start_ns, start_ns + 5_000_000_000);
        b.set_period("cpu", "nanoseconds", 10_000_000);
        let libpy = b.mapping(&Mapping {
            memory_start: 0x7f00_0000_0000,
            memory_limit: 0x7f00_0040_0000,
            file_offset: 0,
            filename: "/usr/lib/libpython3.11.so.1.0",
            build_id: "abcdef0123",
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        for (stack, n, thread) in samples {
            let locs: Vec<LocationId> = stack
                .iter()
                .map(|f| match f % 4 {
                    0 => b.python_frame(
                        &format!("Engine.step{f}"),
                        "/srv/venv/lib/python3.11/site-packages/vllm/engine/llm_engine.py",
                        100,
                        100 + *f as i64,
                    ),
                    1 => b.native_frame(
                        Some(libpy),
                        0x7f00_0000_1000 + *f as u64 * 16,
                        &[
                            Line {
                                name: "inlined_helper",
                                filename: "Objects/obj.c",
                                line: 7,
                                ..Default::default()
                            },
                            Line {
                                name: "_PyEval_EvalFrameDefault",
                                filename: "Python/ceval.c",
                                line: 1200,
                                ..Default::default()
                            },
                        ],
                    ),
                    2 => b.native_frame(None, 0xffff_ffff_8100_0000 + *f as u64, &[]),
                    _ => b.native_frame(
                        Some(libpy),
                        0x7f00_0000_2000 + *f as u64,
                        &[Line {
                            name: "PyObject_Call",
                            system_name: "PyObject_Call",
                            filename: "Objects/call.c",
                            start_line: 300,
                            line: 310,
                        }],
                    ),
                })
                .collect();
            let tid = format!("t{thread}");
            b.add_sample(
                &locs,
                &[*n, n * 10_000_000],
                &[
                    SampleLabel::str("thread", &tid),
                    SampleLabel::num("pid", 42, ""),
                ],
            )
            .unwrap();
        }
        b.build()
    }

    #[test]
    fn builder_dedupes_tables_and_sums_identical_samples() {
        let mut b = ProfileBuilder::new(ProfileKind::Cpu);
        let m = Mapping {
            filename: "/bin/x",
            build_id: "00ff",
            memory_start: 0x1000,
            memory_limit: 0x2000,
            ..Default::default()
        };
        let (m1, m2) = (b.mapping(&m), b.mapping(&m));
        assert_eq!(m1, m2);
        let a = b.python_frame("f", "vllm/a.py", 1, 3);
        let a2 = b.python_frame("f", "vllm/a.py", 1, 3);
        let a_other_line = b.python_frame("f", "vllm/a.py", 1, 4);
        assert_eq!(a, a2);
        assert_ne!(a, a_other_line);
        let n = b.native_frame(
            Some(m1),
            0x1010,
            &[Line {
                name: "main",
                ..Default::default()
            }],
        );
        let l1 = [
            SampleLabel::str("thread", "x"),
            SampleLabel::num("pid", 1, ""),
        ];
        let l2 = [
            SampleLabel::num("pid", 1, ""),
            SampleLabel::str("thread", "x"),
        ];
        b.add_sample(&[a, n], &[1, 10], &l1).unwrap();
        b.add_sample(&[a, n], &[2, 20], &l2).unwrap();
        b.add_sample(&[a_other_line, n], &[1, 10], &l1).unwrap();
        assert_eq!(
            b.add_sample(&[a], &[1], &[]),
            Err(BuildError::ValueCount { got: 1, want: 2 })
        );
        assert_eq!(
            b.add_sample(&[LocationId(99)], &[1, 1], &[]),
            Err(BuildError::UnknownLocation(99))
        );
        assert_eq!(b.sample_count(), 4);
        let p = b.build();
        validate(&p).unwrap();
        assert!(ProfileKind::Cpu.matches(&p));
        assert!(!ProfileKind::Gpu.matches(&p));
        assert_eq!(p.sample.len(), 2, "label order does not split samples");
        assert_eq!(p.sample[0].value, [3, 30]);
        assert_eq!(p.mapping.len(), 1);
        assert_eq!(p.function.len(), 2, "f (one function, two lines) and main");
        assert_eq!(p.location.len(), 3);
        let mut seen = std::collections::HashSet::new();
        assert!(
            p.string_table.iter().all(|s| seen.insert(s)),
            "strings interned once"
        );
        assert_eq!(str_at(&p, p.default_sample_type), Some("cpu"));
        let f = &p.function[0];
        assert_eq!(
            (str_at(&p, f.name), str_at(&p, f.filename), f.start_line),
            (Some("f"), Some("vllm/a.py"), 1)
        );
        assert_eq!(f.system_name, f.name, "empty system name means the name");
    }

    #[test]
    fn inlined_frames_are_lines_of_one_location_and_fold_outer_first() {
        let p = build(&[(vec![1, 0], 3, 0)], 1);
        let native = p.location.iter().find(|l| l.mapping_id != 0).unwrap();
        assert_eq!(
            native.line.len(),
            2,
            "inlined helper + its caller on one location"
        );
        let folded = fold(&p, 0);
        assert_eq!(
            folded,
            [(
                "Engine.step0;_PyEval_EvalFrameDefault;inlined_helper".to_owned(),
                3
            )]
        );
        let unsym = build(&[(vec![2, 3], 1, 0)], 1);
        assert_eq!(
            fold(&unsym, 1)[0].0,
            "PyObject_Call;0xffffffff81000002",
            "no mapping, no lines: the address"
        );
    }

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        let good = encode_gzip(&build(&[(vec![0, 1], 1, 0)], 1));
        assert!(decode(&good, 1 << 20).is_ok());
        assert_eq!(
            decode(b"not a profile at all", 1 << 20)
                .unwrap_err()
                .reason(),
            "protobuf"
        );
        assert_eq!(
            decode(&good[..good.len() / 2], 1 << 20)
                .unwrap_err()
                .reason(),
            "gzip"
        );
        // A gzip bomb: 64 MiB of zeros compress to ~64 KiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 64 << 20]).unwrap();
        let bomb = gz.finish().unwrap();
        assert_eq!(
            decode(&bomb, 1 << 20),
            Err(PprofError::TooLarge { limit: 1 << 20 })
        );
        // Valid protobuf, inconsistent profile.
        let mut p = build(&[(vec![0], 1, 0)], 1);
        p.sample[0].location_id.push(999);
        assert_eq!(
            decode(&encode_gzip(&p), 1 << 20).unwrap_err().reason(),
            "invalid"
        );
        let mut p = build(&[(vec![0], 1, 0)], 1);
        p.function[0].name = 10_000;
        assert_eq!(validate(&p).unwrap_err().reason(), "invalid");
        let mut p = build(&[(vec![0], 1, 0)], 1);
        p.string_table[0] = "x".into();
        assert_eq!(validate(&p).unwrap_err().reason(), "invalid");
        let mut p = build(&[(vec![0], 1, 0)], 1);
        p.sample[0].value.pop();
        assert_eq!(validate(&p).unwrap_err().reason(), "value_count");
        let mut p = build(&[(vec![3], 1, 0)], 1);
        p.location[0].mapping_id = 77;
        assert_eq!(validate(&p).unwrap_err().reason(), "invalid");
    }

    #[test]
    fn merge_remaps_sums_filters_and_spans_time() {
        let a = build(&[(vec![0, 1], 2, 0), (vec![3], 1, 1)], 10_000_000_000);
        let b = build(&[(vec![0, 1], 5, 0), (vec![2, 3], 1, 1)], 20_000_000_000);
        let m = merge([&a, &b], &LabelFilter::default()).unwrap().unwrap();
        validate(&m).unwrap();
        assert_eq!(total(&m, 0), 9);
        assert_eq!(total(&m, 1), 90_000_000);
        assert_eq!(m.sample.len(), 3, "the shared stack is one sample");
        assert_eq!(m.mapping.len(), 1);
        assert_eq!(m.time_nanos, 10_000_000_000);
        assert_eq!(m.duration_nanos, 15_000_000_000);
        assert_eq!(m.period, 10_000_000);
        let t1 = merge(
            [&a, &b],
            &LabelFilter::new(vec![("thread".into(), "t1".into())]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(total(&t1, 0), 2);
        let pid = merge([&a], &LabelFilter::new(vec![("pid".into(), "42".into())]))
            .unwrap()
            .unwrap();
        assert_eq!(
            total(&pid, 0),
            3,
            "numeric labels match their decimal value"
        );
        let mut gpu = ProfileBuilder::new(ProfileKind::Gpu);
        let f = gpu.python_frame("launch", "vllm/x.py", 1, 1);
        gpu.add_sample(&[f], &[1, 1], &[]).unwrap();
        let gpu = gpu.build();
        let mut mg = Merger::new(LabelFilter::default());
        mg.add(&a).unwrap();
        assert_eq!(mg.add(&gpu).unwrap_err().reason(), "sample_types");
        assert_eq!(mg.merged(), 1);
        assert!(merge([], &LabelFilter::default()).unwrap().is_none());
        let e = empty(ProfileKind::OffCpu, 5, 10);
        validate(&e).unwrap();
        assert!(ProfileKind::OffCpu.matches(&e) && e.sample.is_empty());
    }

    #[test]
    fn kinds_parse_and_convert() {
        for k in ProfileKind::ALL {
            assert_eq!(ProfileKind::parse(k.name()), Some(k));
            assert_eq!(ProfileKind::from_pb(k.to_pb()), Some(k));
            assert_eq!(k.sample_types()[0], ("samples", "count"));
        }
        assert_eq!(ProfileKind::parse("OFF_CPU"), Some(ProfileKind::OffCpu));
        assert_eq!(ProfileKind::parse("heap"), None);
        assert_eq!(
            ProfileKind::from_pb(crate::pb::ProfileType::Unspecified),
            None
        );
    }

    fn sample_strategy() -> impl proptest::strategy::Strategy<Value = Vec<(Vec<u8>, i64, u8)>> {
        proptest::collection::vec(
            (proptest::collection::vec(0u8..12, 1..6), 0i64..1000, 0u8..3),
            0..30,
        )
    }

    proptest::proptest! {
        #[test]
        fn encode_decode_round_trip(samples in sample_strategy(), start in 0u64..1 << 62) {
            let p = build(&samples, start);
            let back = decode(&encode_gzip(&p), 64 << 20).unwrap();
            proptest::prop_assert_eq!(&back, &p);
            let raw = p.encode_to_vec();
            proptest::prop_assert_eq!(decode(&raw, 64 << 20).unwrap(), p);
        }

        #[test]
        fn merge_is_associative_and_preserves_totals(
            a in sample_strategy(), b in sample_strategy(), c in sample_strategy(),
        ) {
            let (pa, pb_, pc) = (build(&a, 1), build(&b, 2), build(&c, 3));
            let f = LabelFilter::default();
            let ab = merge([&pa, &pb_], &f).unwrap().unwrap();
            let left = merge([&ab, &pc], &f).unwrap().unwrap();
            let bc = merge([&pb_, &pc], &f).unwrap().unwrap();
            let right = merge([&pa, &bc], &f).unwrap().unwrap();
            let flat = merge([&pa, &pb_, &pc], &f).unwrap().unwrap();
            validate(&left).unwrap();
            proptest::prop_assert_eq!(canonical(&left), canonical(&right));
            proptest::prop_assert_eq!(canonical(&left), canonical(&flat));
            for i in 0..2 {
                proptest::prop_assert_eq!(total(&left, i), total(&pa, i) + total(&pb_, i) + total(&pc, i));
            }
            // Merging is exactly what building all samples in one builder gives.
            let all: Vec<_> = a.iter().chain(&b).chain(&c).cloned().collect();
            proptest::prop_assert_eq!(canonical(&flat), canonical(&build(&all, 1)));
            // Folded totals agree with sample totals.
            let folded: i64 = fold(&flat, 0).iter().map(|(_, v)| v).sum();
            proptest::prop_assert_eq!(folded, total(&flat, 0));
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(&data, 1 << 16);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&data).unwrap();
            let _ = decode(&gz.finish().unwrap(), 1 << 16);
        }
    }
}
