//! A small reader for BTF, the kernel's type information (`/sys/kernel/btf/vmlinux`): enough to
//! find a structure member's offset and a function prototype's parameters, which the probes
//! need to read kernel structures without kprobes or CO-RE (aya 0.14's `Btf` keeps member
//! offsets private).
//!
//! The format (include/uapi/linux/btf.h): a header, a type section (records of every kind the
//! kernel defines, each a fixed part and a kind-specific tail) and a string section. Type ids
//! count from 1 in section order; 0 is `void`. Everything is checked against the data: a
//! truncated file, a bad magic, a count or an offset that runs past its section is an error,
//! never a panic or an allocation sized by the input. Split BTF (kernel modules, which number
//! their types after vmlinux's) is not read.

use std::path::Path;

/// Where the running kernel exposes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// Fixed part of every type record: name offset, info, size-or-type.
const TYPE_LEN: usize = 12;

/// Why BTF could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("bad BTF magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported BTF version {0}")]
    Version(u8),
    #[error("BTF header: {0}")]
    Header(&'static str),
    #[error("BTF type {id} at byte {at} of the type section: {what}")]
    Type {
        id: u32,
        at: usize,
        what: &'static str,
    },
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u8 },
    #[error("reading {path}: {error}")]
    Io { path: String, error: String },
}

/// A BTF type kind (`BTF_KIND_*`, named as in include/uapi/linux/btf.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Type id 0.
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(v: u8) -> Option<Self> {
        Some(match v {
            0 => Kind::Void,
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Bytes of the kind-specific tail after the fixed part, for `vlen` entries.
    fn tail_len(self, vlen: usize) -> usize {
        match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => 12 * vlen,
            Kind::Enum | Kind::FuncProto => 8 * vlen,
            _ => 0,
        }
    }

    /// Kinds whose size-or-type field names another type.
    fn refers(self) -> bool {
        matches!(
            self,
            Kind::Ptr
                | Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::Func
                | Kind::FuncProto
                | Kind::Var
                | Kind::DeclTag
                | Kind::TypeTag
        )
    }
}

/// One type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Type {
    /// Its kind.
    pub kind: Kind,
    name_off: u32,
    /// Entries of the kind's list (members, parameters, enumerators, variables).
    pub vlen: u16,
    /// `kind_flag`: bitfield-encoded member offsets (STRUCT/UNION), a forward declaration of a
    /// union (FWD), a signed enum (ENUM/ENUM64).
    pub kflag: bool,
    /// Bytes (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC) or the type this one refers to
    /// (PTR, TYPEDEF, the qualifiers, FUNC, FUNC_PROTO's return type, VAR, DECL_TAG, TYPE_TAG).
    pub size_or_type: u32,
    /// INT: its encoding word (bit offset in bits 16..24, bits in 0..8). ARRAY: element type.
    /// DECL_TAG: component index.
    extra: u32,
    /// ARRAY: index type and element count.
    array: (u32, u32),
    /// Start of this type's entries in `Btf::members` or `Btf::params`.
    first: u32,
}

impl Type {
    /// Bit offset (INT with a sub-word encoding: bitfields in old-style BTF).
    fn int_offset(&self) -> u32 {
        (self.extra >> 16) & 0xff
    }

    /// Bits of an INT.
    fn int_bits(&self) -> u32 {
        self.extra & 0xff
    }
}

/// A STRUCT or UNION member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    name_off: u32,
    /// The member's type.
    pub type_id: u32,
    /// Bits from the start of the enclosing structure.
    pub bit_offset: u32,
    /// Bits of a bitfield member; 0 for an ordinary one.
    pub bitfield_size: u8,
}

/// A FUNC_PROTO parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    name_off: u32,
    /// The parameter's type (0 for the `...` of a variadic prototype).
    pub type_id: u32,
}

/// Where a member lies in a structure, nested anonymous members included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Bits from the start of the outer structure.
    pub bit_offset: u64,
    /// Bits of a bitfield member (from either encoding); 0 for an ordinary one.
    pub bitfield_size: u8,
    /// The member's type.
    pub type_id: u32,
}

impl MemberInfo {
    /// Byte offset of an ordinary, byte-aligned member; `None` for a bitfield.
    pub fn byte_offset(&self) -> Option<u64> {
        (self.bitfield_size == 0 && self.bit_offset.is_multiple_of(8))
            .then_some(self.bit_offset / 8)
    }
}

/// Parsed BTF. Parsing the kernel's (≈ 5 MiB, ≈ 150 k types) keeps about twice its size in
/// memory while the value lives: read it, take what is needed, drop it.
#[derive(Debug)]
pub struct Btf {
    /// Indexed by type id; entry 0 is `void`.
    types: Vec<Type>,
    members: Vec<Member>,
    params: Vec<Param>,
    strings: Vec<u8>,
}

/// Reads integers of the data's byte order.
#[derive(Clone, Copy)]
struct Reader<'a> {
    data: &'a [u8],
    big: bool,
}

impl Reader<'_> {
    fn u16(&self, at: usize) -> Option<u16> {
        let b: [u8; 2] = self.data.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&self, at: usize) -> Option<u32> {
        let b: [u8; 4] = self.data.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
}

impl Btf {
    /// The running kernel's BTF ([`VMLINUX`]).
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    /// Reads and parses a BTF file.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|e| BtfError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Self::parse(&data)
    }

    /// Parses raw BTF (either byte order).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < HEADER_LEN {
            return Err(BtfError::Short(data.len()));
        }
        let big = match [data[0], data[1]] {
            [0x9f, 0xeb] => false,
            [0xeb, 0x9f] => true,
            m => return Err(BtfError::BadMagic(u16::from_le_bytes(m))),
        };
        let r = Reader { data, big };
        debug_assert_eq!(r.u16(0), Some(MAGIC));
        if data[2] != 1 {
            return Err(BtfError::Version(data[2]));
        }
        let field = |at| r.u32(at).map(|v| v as usize).expect("inside the header");
        let hdr_len = field(4);
        let (type_off, type_len, str_off, str_len) = (field(8), field(12), field(16), field(20));
        if hdr_len < HEADER_LEN || hdr_len > data.len() {
            return Err(BtfError::Header("header length out of range"));
        }
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            let end = start.checked_add(len)?;
            (end <= data.len()).then_some(start..end)
        };
        let types = section(type_off, type_len)
            .ok_or(BtfError::Header("type section runs past the data"))?;
        let strs = section(str_off, str_len)
            .ok_or(BtfError::Header("string section runs past the data"))?;
        if type_off % 4 != 0 || type_len % 4 != 0 {
            return Err(BtfError::Header("type section not 4-byte aligned"));
        }
        if types.start < strs.end && strs.start < types.end {
            return Err(BtfError::Header("type and string sections overlap"));
        }
        let strings = data[strs].to_vec();
        if strings.first().is_some_and(|&b| b != 0) || strings.last().is_some_and(|&b| b != 0) {
            return Err(BtfError::Header(
                "string section does not start and end with a NUL",
            ));
        }
        let mut btf = Btf {
            // Every type takes at least TYPE_LEN bytes: the capacity is bounded by the data.
            types: Vec::with_capacity(type_len / TYPE_LEN + 1),
            members: Vec::new(),
            params: Vec::new(),
            strings,
        };
        btf.types.push(Type {
            kind: Kind::Void,
            name_off: 0,
            vlen: 0,
            kflag: false,
            size_or_type: 0,
            extra: 0,
            array: (0, 0),
            first: 0,
        });
        let sec = Reader {
            data: &data[types],
            big,
        };
        let mut at = 0usize;
        while at < type_len {
            let id = btf.types.len() as u32;
            let err = |what| BtfError::Type { id, at, what };
            let (Some(name_off), Some(info), Some(size_or_type)) =
                (sec.u32(at), sec.u32(at + 4), sec.u32(at + 8))
            else {
                return Err(err("record cut short"));
            };
            let raw_kind = ((info >> 24) & 0x1f) as u8;
            let kind = match Kind::from_raw(raw_kind) {
                Some(k) if k != Kind::Void => k,
                _ => return Err(BtfError::UnknownKind { id, kind: raw_kind }),
            };
            let vlen = (info & 0xffff) as u16;
            let kflag = info >> 31 == 1;
            let tail = at + TYPE_LEN;
            let end = tail + kind.tail_len(vlen as usize);
            if end > type_len {
                return Err(err("record cut short"));
            }
            btf.check_name(name_off)
                .ok_or_else(|| err("name outside the string section"))?;
            let mut t = Type {
                kind,
                name_off,
                vlen,
                kflag,
                size_or_type,
                extra: 0,
                array: (0, 0),
                first: 0,
            };
            let word = |i: usize| sec.u32(tail + 4 * i).expect("inside the checked record");
            match kind {
                Kind::Int | Kind::Var | Kind::DeclTag => t.extra = word(0),
                Kind::Array => {
                    t.extra = word(0);
                    t.array = (word(1), word(2));
                }
                Kind::Struct | Kind::Union => {
                    t.first = btf.members.len() as u32;
                    for i in 0..vlen as usize {
                        let (name_off, type_id, offset) =
                            (word(3 * i), word(3 * i + 1), word(3 * i + 2));
                        btf.check_name(name_off)
                            .ok_or_else(|| err("member name outside the string section"))?;
                        let (bit_offset, bitfield_size) = if kflag {
                            (offset & 0xff_ffff, (offset >> 24) as u8)
                        } else {
                            (offset, 0)
                        };
                        btf.members.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                }
                Kind::FuncProto => {
                    t.first = btf.params.len() as u32;
                    for i in 0..vlen as usize {
                        btf.params.push(Param {
                            name_off: word(2 * i),
                            type_id: word(2 * i + 1),
                        });
                    }
                }
                // Enumerators, DATASEC variables: sized above, not kept.
                _ => {}
            }
            btf.types.push(t);
            at = end;
        }
        // Every reference must name a type that exists.
        let n = btf.types.len() as u32;
        for (id, t) in btf.types.iter().enumerate() {
            let id = id as u32;
            let bad = |what| BtfError::Type { id, at: 0, what };
            if t.kind.refers() && t.size_or_type >= n {
                return Err(bad("refers to a type that does not exist"));
            }
            if t.kind == Kind::Array && (t.extra >= n || t.array.0 >= n) {
                return Err(bad("array of a type that does not exist"));
            }
            if btf.members(id).iter().any(|m| m.type_id >= n) {
                return Err(bad("member of a type that does not exist"));
            }
            if btf.params(id).iter().any(|p| p.type_id >= n) {
                return Err(bad("parameter of a type that does not exist"));
            }
        }
        Ok(btf)
    }

    fn check_name(&self, off: u32) -> Option<()> {
        ((off as usize) < self.strings.len().max(1)).then_some(())
    }

    /// Number of type ids, `void` included.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Always false: `void` is there.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The type with id `id`.
    pub fn type_by_id(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    fn string(&self, off: u32) -> Option<&str> {
        let s = self.strings.get(off as usize..)?;
        let end = s.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&s[..end]).ok()
    }

    /// A type's name ("" when anonymous; `None` when not valid UTF-8).
    pub fn name(&self, t: &Type) -> Option<&str> {
        self.string(t.name_off)
    }

    /// A member's name ("" for an anonymous struct or union member).
    pub fn member_name(&self, m: &Member) -> Option<&str> {
        self.string(m.name_off)
    }

    /// A parameter's name ("" when the prototype does not name it).
    pub fn param_name(&self, p: &Param) -> Option<&str> {
        self.string(p.name_off)
    }

    /// The first type of kind `kind` named `name`.
    pub fn find(&self, kind: Kind, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == kind && self.name(t) == Some(name))
            .map(|i| i as u32)
    }

    /// Members of a STRUCT or UNION (empty for other kinds).
    pub fn members(&self, id: u32) -> &[Member] {
        match self.type_by_id(id) {
            Some(t) if matches!(t.kind, Kind::Struct | Kind::Union) => {
                let first = t.first as usize;
                &self.members[first..first + t.vlen as usize]
            }
            _ => &[],
        }
    }

    /// Parameters of a FUNC_PROTO (empty for other kinds). A variadic prototype ends with a
    /// parameter of type 0.
    pub fn params(&self, id: u32) -> &[Param] {
        match self.type_by_id(id) {
            Some(t) if t.kind == Kind::FuncProto => {
                let first = t.first as usize;
                &self.params[first..first + t.vlen as usize]
            }
            _ => &[],
        }
    }

    /// `id` without typedefs, qualifiers and type tags.
    pub fn resolve(&self, mut id: u32) -> Option<u32> {
        // A well-formed chain is short; a cycle in bad input ends here.
        for _ in 0..64 {
            let t = self.type_by_id(id)?;
            match t.kind {
                Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag => {
                    id = t.size_or_type
                }
                _ => return Some(id),
            }
        }
        None
    }

    /// Bytes of a value of type `id` (`None` for `void`, functions, forward declarations).
    pub fn size_of(&self, id: u32) -> Option<u64> {
        self.size_of_depth(id, 0)
    }

    fn size_of_depth(&self, id: u32, depth: u32) -> Option<u64> {
        if depth > 64 {
            return None;
        }
        let id = self.resolve(id)?;
        let t = self.type_by_id(id)?;
        match t.kind {
            Kind::Int
            | Kind::Struct
            | Kind::Union
            | Kind::Enum
            | Kind::Enum64
            | Kind::Float
            | Kind::Datasec => Some(t.size_or_type as u64),
            Kind::Ptr => Some(8),
            Kind::Array => self
                .size_of_depth(t.extra, depth + 1)?
                .checked_mul(t.array.1 as u64),
            _ => None,
        }
    }

    /// Member `name` of STRUCT or UNION `id`, looked for through its anonymous struct and union
    /// members too (their offsets added), with the bitfield size from either encoding.
    pub fn member(&self, id: u32, name: &str) -> Option<MemberInfo> {
        self.member_depth(self.resolve(id)?, name, 0)
    }

    fn member_depth(&self, id: u32, name: &str, depth: u32) -> Option<MemberInfo> {
        if depth > 32 {
            return None;
        }
        let t = self.type_by_id(id)?;
        for m in self.members(id) {
            let mname = self.member_name(m)?;
            if mname == name {
                let mut info = MemberInfo {
                    bit_offset: m.bit_offset as u64,
                    bitfield_size: m.bitfield_size,
                    type_id: m.type_id,
                };
                // Without kind_flag a bitfield is an INT whose encoding is narrower than it.
                if !t.kflag {
                    if let Some(it) = self.resolve(m.type_id).and_then(|i| self.type_by_id(i)) {
                        if it.kind == Kind::Int
                            && (it.int_offset() != 0 || it.int_bits() < 8 * it.size_or_type)
                        {
                            info.bit_offset += it.int_offset() as u64;
                            info.bitfield_size = it.int_bits() as u8;
                        }
                    }
                }
                return Some(info);
            }
            if mname.is_empty() {
                let inner = self.resolve(m.type_id)?;
                if matches!(
                    self.type_by_id(inner).map(|t| t.kind),
                    Some(Kind::Struct | Kind::Union)
                ) {
                    if let Some(mut info) = self.member_depth(inner, name, depth + 1) {
                        info.bit_offset += m.bit_offset as u64;
                        return Some(info);
                    }
                }
            }
        }
        None
    }

    /// Member `member` of the structure named `strukt`.
    pub fn struct_member(&self, strukt: &str, member: &str) -> Option<MemberInfo> {
        self.member(self.find(Kind::Struct, strukt)?, member)
    }

    /// How many arguments raw tracepoint `name` passes a BPF program: the parameters of the
    /// prototype of the kernel's `btf_trace_<name>` typedef (a pointer to a function taking the
    /// tracepoint's private data, then its `TP_PROTO` arguments) minus that first one. `None`
    /// when this BTF does not define the typedef.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let td = self.find(Kind::Typedef, &format!("btf_trace_{name}"))?;
        let ptr = self.resolve(self.type_by_id(td)?.size_or_type)?;
        let ptr = self.type_by_id(ptr)?;
        if ptr.kind != Kind::Ptr {
            return None;
        }
        let proto = self.resolve(ptr.size_or_type)?;
        if self.type_by_id(proto)?.kind != Kind::FuncProto {
            return None;
        }
        self.params(proto).len().checked_sub(1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds BTF in memory, little-endian, as a kernel or pahole would lay it out.
    #[derive(Default)]
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        pub(crate) fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        pub(crate) fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn words(&mut self, w: &[u32]) {
            for v in w {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
        }

        pub(crate) fn add(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kflag: bool,
            size_or_type: u32,
            tail: &[u32],
        ) -> u32 {
            let name = self.str(name);
            let info = (kflag as u32) << 31 | kind << 24 | vlen;
            self.words(&[name, info, size_or_type]);
            self.words(tail);
            self.next_id += 1;
            self.next_id - 1
        }

        pub(crate) fn int(&mut self, name: &str, bytes: u32) -> u32 {
            self.add(name, 1, 0, false, bytes, &[bytes * 8])
        }

        /// A structure from (name, type, bit offset, bitfield bits) members.
        pub(crate) fn strukt(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kflag: bool,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let mut tail = Vec::new();
            for &(n, t, off, bits) in members {
                let n = self.str(n);
                let off = if kflag { bits << 24 | off } else { off };
                tail.extend_from_slice(&[n, t, off]);
            }
            self.add(name, kind, members.len() as u32, kflag, size, &tail)
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for v in [
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// One of every kind, with the members and parameters the lookups follow.
    fn every_kind() -> (Vec<u8>, u32) {
        let mut b = Builder::new();
        let int = b.int("int", 4); // 1
        let uint = b.add("unsigned int", 1, 0, false, 4, &[32]); // 2
        let ptr = b.add("", 2, 0, false, 0, &[]); // 3: void *
        let arr = b.add("", 3, 0, false, 0, &[int, uint, 16]); // 4: int[16]
        let (a, bb) = (b.str("A"), b.str("B"));
        let en = b.add("state", 6, 2, false, 4, &[a, 0, bb, 1]); // 5
        let fwd = b.add("later", 7, 0, false, 0, &[]); // 6
        let td = b.add("pid_t", 8, 0, false, int, &[]); // 7
        let vol = b.add("", 9, 0, false, td, &[]); // 8: volatile pid_t
        let cst = b.add("", 10, 0, false, vol, &[]); // 9
        let rst = b.add("", 11, 0, false, ptr, &[]); // 10
        let tag = b.add("user", 18, 0, false, ptr, &[]); // 11
        let flt = b.add("double", 16, 0, false, 8, &[]); // 12
        let x = b.str("X");
        let e64 = b.add("big", 19, 1, true, 8, &[x, 1, 2]); // 13
                                                            // 14: an anonymous struct { int x; int y:3 (old-style bitfield through an INT); }
        let bits3 = b.add("int", 1, 0, false, 4, &[3]); // 14: int:3
        let anon = b.strukt(4, "", 8, false, &[("x", int, 0, 0), ("y", bits3, 32, 0)]); // 15
        let un = b.strukt(5, "", 4, false, &[("u", uint, 0, 0)]); // 16: union { unsigned u; }
                                                                  // 17: struct task { pid_t pid; const volatile pid_t tgid; unsigned int __state; int
                                                                  // arr[16]; struct { x, y:3 } ; union { u }; unsigned flags:5 (kind_flag bitfield) }
        let task = b.strukt(
            4,
            "task",
            112,
            true,
            &[
                ("pid", td, 0, 0),
                ("tgid", cst, 32, 0),
                ("__state", uint, 64, 0),
                ("arr", arr, 96, 0),
                ("", anon, 608, 0),
                ("", un, 672, 0),
                ("flags", uint, 707, 5),
            ],
        );
        let tptr = b.add("", 2, 0, false, task, &[]); // 18: struct task *
        let boolean = b.add("_Bool", 1, 0, false, 1, &[0x4 << 24 | 8]); // 19
        let names = ["__data", "preempt", "prev", "next", "prev_state"].map(|n| b.str(n));
        let proto = b.add(
            "",
            13,
            5,
            false,
            0,
            &[
                names[0], ptr, names[1], boolean, names[2], tptr, names[3], tptr, names[4], uint,
            ],
        ); // 20
        let pproto = b.add("", 2, 0, false, proto, &[]); // 21
        b.add("btf_trace_sched_switch", 8, 0, false, pproto, &[]); // 22
        let func = b.add("schedule", 12, 1, false, proto, &[]); // 23
        let var = b.add("jiffies", 14, 0, false, uint, &[1]); // 24
        b.add(".data", 15, 1, false, 8, &[var, 0, 8]); // 25
        b.add("noinline", 17, 0, false, func, &[u32::MAX]); // 26
        let _ = (rst, tag, flt, e64, en, fwd);
        (b.build(), task)
    }

    #[test]
    fn reads_every_kind_and_finds_members() {
        let (data, task) = every_kind();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.len(), 27);
        let kinds: Vec<Kind> = (0..btf.len() as u32)
            .map(|i| btf.type_by_id(i).unwrap().kind)
            .collect();
        for k in [
            Kind::Void,
            Kind::Int,
            Kind::Ptr,
            Kind::Array,
            Kind::Struct,
            Kind::Union,
            Kind::Enum,
            Kind::Fwd,
            Kind::Typedef,
            Kind::Volatile,
            Kind::Const,
            Kind::Restrict,
            Kind::Func,
            Kind::FuncProto,
            Kind::Var,
            Kind::Datasec,
            Kind::Float,
            Kind::DeclTag,
            Kind::TypeTag,
            Kind::Enum64,
        ] {
            assert!(kinds.contains(&k), "{k:?}");
        }
        assert_eq!(btf.find(Kind::Struct, "task"), Some(task));
        let m = |n| btf.struct_member("task", n).unwrap();
        assert_eq!(m("pid").byte_offset(), Some(0));
        assert_eq!(m("tgid").byte_offset(), Some(4));
        assert_eq!(m("__state").byte_offset(), Some(8));
        assert_eq!(m("arr").byte_offset(), Some(12));
        // Through the anonymous struct at bit 608 (byte 76) and union at 672 (byte 84).
        assert_eq!(m("x").byte_offset(), Some(76));
        assert_eq!(m("u").byte_offset(), Some(84));
        // Bitfields: old-style (INT encoding, 3 bits) and kind_flag (5 bits at bit 707).
        let y = m("y");
        assert_eq!(
            (y.bit_offset, y.bitfield_size, y.byte_offset()),
            (640, 3, None)
        );
        let f = m("flags");
        assert_eq!(
            (f.bit_offset, f.bitfield_size, f.byte_offset()),
            (707, 5, None)
        );
        assert_eq!(btf.struct_member("task", "nope"), None);
        assert_eq!(btf.struct_member("nope", "pid"), None);
        // Sizes through typedefs and qualifiers; arrays multiply.
        assert_eq!(btf.size_of(m("tgid").type_id), Some(4));
        assert_eq!(btf.size_of(m("arr").type_id), Some(64));
        assert_eq!(btf.size_of(task), Some(112));
        assert_eq!(btf.size_of(0), None);
        assert_eq!(btf.tracepoint_args("sched_switch"), Some(4));
        assert_eq!(btf.tracepoint_args("sched_wakeup"), None);
        let proto = btf.find(Kind::FuncProto, "").unwrap();
        let names: Vec<&str> = btf
            .params(proto)
            .iter()
            .map(|p| btf.param_name(p).unwrap())
            .collect();
        assert_eq!(names, ["__data", "preempt", "prev", "next", "prev_state"]);
    }

    #[test]
    fn big_endian_btf_reads_the_same() {
        let (le, _) = every_kind();
        // Swap every 4-byte word of the header (after magic/version/flags) and type section.
        let mut be = le.clone();
        be[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        let type_len = u32::from_le_bytes(le[12..16].try_into().unwrap()) as usize;
        for at in (4..HEADER_LEN + type_len).step_by(4) {
            be[at..at + 4].reverse();
        }
        let btf = Btf::parse(&be).unwrap();
        assert_eq!(
            btf.struct_member("task", "x").unwrap().byte_offset(),
            Some(76)
        );
        assert_eq!(btf.tracepoint_args("sched_switch"), Some(4));
    }

    #[test]
    fn malformed_btf_is_an_error() {
        let (good, _) = every_kind();
        // Every truncation: an error, never a panic (most cut a record or a section).
        for cut in 0..good.len() {
            assert!(Btf::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(Btf::parse(&[0; 8]), Err(BtfError::Short(8))));
        let mut bad = good.clone();
        bad[0] = 0x12;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadMagic(_))));
        let mut bad = good.clone();
        bad[2] = 2;
        assert_eq!(Btf::parse(&bad).unwrap_err(), BtfError::Version(2));
        // Huge section lengths and offsets.
        for field in [4usize, 8, 12, 16, 20] {
            let mut bad = good.clone();
            bad[field..field + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            assert!(Btf::parse(&bad).is_err(), "field {field}");
        }
        // A record claiming 65535 members runs past the section.
        let mut bad = good.clone();
        let info_at = find_info(&good, 4);
        bad[info_at..info_at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(Btf::parse(&bad), Err(BtfError::Type { .. })));
        // An unknown kind.
        let mut bad = good.clone();
        let info_at = find_info(&good, 16);
        bad[info_at + 3] = 31;
        assert!(matches!(
            Btf::parse(&bad),
            Err(BtfError::UnknownKind { kind: 31, .. })
        ));
        // A name offset past the strings, a reference to a type that does not exist.
        let mut bad = good.clone();
        bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Btf::parse(&bad).is_err());
        let mut bad = good.clone();
        let info_at = find_info(&good, 8);
        bad[info_at + 4..info_at + 8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(Btf::parse(&bad).is_err());
        // A typedef cycle parses (it is well-formed record by record) but resolves to nothing.
        let mut b = Builder::new();
        b.add("a", 8, 0, false, 2, &[]);
        b.add("b", 8, 0, false, 1, &[]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!((btf.resolve(1), btf.size_of(1)), (None, None));
    }

    /// Byte offset of the info word of the first type of raw kind `kind` in `every_kind`'s data.
    fn find_info(data: &[u8], kind: u8) -> usize {
        let type_len = u32::from_le_bytes(data[12..16].try_into().unwrap()) as usize;
        let mut at = HEADER_LEN;
        while at < HEADER_LEN + type_len {
            let info = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
            let k = Kind::from_raw(((info >> 24) & 0x1f) as u8).unwrap();
            if (info >> 24) as u8 & 0x1f == kind {
                return at + 4;
            }
            at += TYPE_LEN + k.tail_len((info & 0xffff) as usize);
        }
        panic!("no kind {kind}");
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), keep in 0usize..4) {
            // Keep a valid magic and version now and then so the parser goes past the header.
            if keep > 0 && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&[0x9f, 0xeb, 1, 0]);
            }
            if let Ok(btf) = Btf::parse(&bytes) {
                for id in 0..btf.len() as u32 {
                    let _ = btf.size_of(id);
                    let _ = btf.member(id, "pid");
                }
                let _ = btf.tracepoint_args("sched_switch");
            }
        }

        #[test]
        fn corrupted_real_btf_never_panics(flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..16)) {
            let (mut data, _) = every_kind();
            for (at, v) in flips {
                let at = at % data.len();
                data[at] = v;
            }
            if let Ok(btf) = Btf::parse(&data) {
                let _ = btf.struct_member("task", "flags");
                let _ = btf.tracepoint_args("sched_switch");
                for id in 0..btf.len() as u32 {
                    let _ = btf.size_of(id);
                }
            }
        }
    }

    // ---- the running kernel's BTF -------------------------------------------------------

    fn vmlinux(test: &str) -> Option<Btf> {
        if !Path::new(VMLINUX).exists() {
            let why = format!("{VMLINUX} missing (kernel without CONFIG_DEBUG_INFO_BTF)");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: {why}"
            );
            eprintln!("SKIP {test}: {why}");
            return None;
        }
        Some(Btf::vmlinux().expect("the kernel's BTF parses"))
    }

    #[test]
    fn vmlinux_btf_has_the_kernel_types() {
        let Some(btf) = vmlinux("vmlinux_btf_has_the_kernel_types") else {
            return;
        };
        assert!(btf.len() > 10_000, "{} types", btf.len());
        let task = btf
            .find(Kind::Struct, "task_struct")
            .expect("struct task_struct");
        // pid and tgid are pid_t (a typedef of int), next to each other.
        let pid = btf.member(task, "pid").unwrap();
        let tgid = btf.member(task, "tgid").unwrap();
        assert_eq!(btf.size_of(pid.type_id), Some(4));
        let pid_t = btf.type_by_id(pid.type_id).unwrap();
        assert_eq!(
            (pid_t.kind, btf.name(pid_t)),
            (Kind::Typedef, Some("pid_t"))
        );
        assert_eq!(tgid.byte_offset(), pid.byte_offset().map(|o| o + 4));
        let state = btf
            .member(task, "__state")
            .or_else(|| btf.member(task, "state"))
            .unwrap();
        assert!(state.byte_offset().unwrap() < pid.byte_offset().unwrap());
        assert!(btf
            .member(task, "exit_state")
            .unwrap()
            .byte_offset()
            .is_some());
        // Bitfields in task_struct (sched_reset_on_fork and friends).
        let b = btf.member(task, "sched_reset_on_fork").unwrap();
        assert_eq!(b.bitfield_size, 1);
        assert!(btf.size_of(task).unwrap() > pid.byte_offset().unwrap());
        // struct list_head is two pointers.
        let lh = btf.find(Kind::Struct, "list_head").unwrap();
        assert_eq!(btf.size_of(lh), Some(16));
        assert_eq!(btf.member(lh, "prev").unwrap().byte_offset(), Some(8));
    }

    #[test]
    fn vmlinux_sched_switch_prototype() {
        let Some(btf) = vmlinux("vmlinux_sched_switch_prototype") else {
            return;
        };
        // 5.18+ passes prev_state as a fourth argument.
        let (major, minor) = super::super::profile::kernel_release().unwrap();
        let args = btf
            .tracepoint_args("sched_switch")
            .expect("btf_trace_sched_switch");
        assert_eq!(args, if (major, minor) >= (5, 18) { 4 } else { 3 });
        let td = btf.find(Kind::Typedef, "btf_trace_sched_switch").unwrap();
        let ptr = btf.type_by_id(td).unwrap().size_or_type;
        let proto = btf.type_by_id(ptr).unwrap().size_or_type;
        let params = btf.params(proto);
        let prev = btf.resolve(params[2].type_id).unwrap();
        let prev = btf.type_by_id(prev).unwrap();
        assert_eq!(prev.kind, Kind::Ptr);
        assert_eq!(
            btf.find(Kind::Struct, "task_struct"),
            btf.resolve(prev.size_or_type)
        );
        // sys_enter: (struct pt_regs *regs, long id).
        assert_eq!(btf.tracepoint_args("sys_enter"), Some(2));
    }
}
