//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): enough to find where a
//! struct member lives, what an enum's values are called and how many arguments a BTF tracepoint
//! has.
//!
//! aya parses BTF too, but keeps member lookups private; the BTF crates that expose them are
//! LGPL. The format is small and stable (include/uapi/linux/btf.h), so this reads just what the
//! agent needs, with every length checked.
use std::{collections::HashMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("the kernel's struct {0} has no field {1}")]
    NoMember(String, String),
    #[error("the kernel's {0}.{1} is a bit field; this connprobe cannot read it")]
    Bitfield(String, String),
    #[error("the kernel's BTF has no enum value {0}::{1}")]
    NoEnumValue(String, String),
    #[error("the kernel's BTF has no enum {0}")]
    NoEnum(String),
    #[error("the kernel's BTF has no tracepoint {0}")]
    NoTracepoint(String),
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct RawMember {
    name_off: u32,
    type_id: u32,
    offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` for ints, structs, unions, enums; the referenced type for modifiers and pointers.
    size_or_type: u32,
    /// Struct/union members; for arrays one entry (element type, nelems in `offset`).
    members: Vec<RawMember>,
    /// FUNC_PROTO parameter count.
    params: u32,
}

/// Where a member lives in its outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the struct.
    pub offset: u32,
    /// Size in bytes of the member's type.
    pub size: u32,
}

pub struct Btf {
    /// Index 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
    /// Struct and union names to type ids (the first with members wins).
    by_name: HashMap<String, u32>,
}

fn u16_at(data: &[u8], at: usize) -> Result<u16, BtfError> {
    data.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub const VMLINUX: &'static str = "/sys/kernel/btf/vmlinux";

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses raw (little-endian) BTF.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF?)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize| {
            let start = hdr_len
                .checked_add(off)
                .ok_or(BtfError::Malformed("offset"))?;
            let end = start
                .checked_add(len)
                .ok_or(BtfError::Malformed("length"))?;
            data.get(start..end)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: Vec::new(),
            params: 0,
        }];
        let mut at = 0;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                name_off,
                kind,
                kind_flag,
                size_or_type,
                members: Vec::new(),
                params: 0,
            };
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => {
                    ty.members.push(RawMember {
                        name_off: 0,
                        type_id: u32_at(type_data, at)?,
                        offset: u32_at(type_data, at + 8)?,
                    });
                    12
                }
                KIND_STRUCT | KIND_UNION => {
                    ty.members.reserve(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        ty.members.push(RawMember {
                            name_off: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            offset: u32_at(type_data, m + 8)?,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM => {
                    for i in 0..vlen {
                        let e = at + i * 8;
                        ty.members.push(RawMember {
                            name_off: u32_at(type_data, e)?,
                            type_id: 0,
                            offset: u32_at(type_data, e + 4)?,
                        });
                    }
                    vlen * 8
                }
                KIND_FUNC_PROTO => {
                    ty.params = vlen as u32;
                    vlen * 8
                }
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            types.push(ty);
        }
        if at != type_data.len() {
            return Err(BtfError::Malformed("type section does not end on a type"));
        }

        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let ty = &btf.types[id];
            let named_composite =
                matches!(ty.kind, KIND_STRUCT | KIND_UNION | KIND_TYPEDEF | KIND_ENUM);
            if named_composite && ty.name_off != 0 {
                let name = btf.name(ty.name_off).to_string();
                let has_body = ty.kind == KIND_TYPEDEF || !ty.members.is_empty();
                if has_body {
                    btf.by_name.entry(name).or_insert(id as u32);
                }
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(id as usize)
    }

    /// Follows typedefs and modifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Some(id),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u32> {
        let id = self.resolve(id)?;
        let ty = self.ty(id)?;
        match ty.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Some(ty.size_or_type)
            }
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let elem = ty.members.first()?;
                Some(self.size_of(elem.type_id)? * elem.offset)
            }
            _ => None,
        }
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        let id = *self
            .by_name
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        self.resolve(id)
            .filter(|&id| matches!(self.ty(id).map(|t| t.kind), Some(KIND_STRUCT | KIND_UNION)))
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))
    }

    /// Finds `name` among the members of type `id`, looking through anonymous structs and
    /// unions. Returns the bit offset from the start of `id` and the member.
    fn find(&self, id: u32, name: &str, depth: u32) -> Option<(u32, RawMember, bool)> {
        if depth > 8 {
            return None;
        }
        let ty = self.ty(id)?;
        for m in &ty.members {
            let bit_offset = if ty.kind_flag {
                m.offset & 0xff_ffff
            } else {
                m.offset
            };
            let bitfield = ty.kind_flag && (m.offset >> 24) != 0;
            if m.name_off != 0 && self.name(m.name_off) == name {
                return Some((bit_offset, *m, bitfield));
            }
            if m.name_off == 0 {
                let inner = self.resolve(m.type_id)?;
                if matches!(self.ty(inner)?.kind, KIND_STRUCT | KIND_UNION)
                    && let Some((off, found, bf)) = self.find(inner, name, depth + 1)
                {
                    return Some((bit_offset + off, found, bf));
                }
            }
        }
        None
    }

    /// Byte offset and size of `path` (e.g. `["sk_err"]` or `["__sk_common", "skc_family"]`)
    /// inside struct `outer`.
    pub fn member(&self, outer: &str, path: &[&str]) -> Result<Member, BtfError> {
        let missing = || BtfError::NoMember(outer.to_string(), path.join("."));
        let mut id = self.struct_id(outer)?;
        let mut bits = 0u32;
        let mut last = None;
        for (i, part) in path.iter().enumerate() {
            let (off, m, bitfield) = self.find(id, part, 0).ok_or_else(missing)?;
            if bitfield || off % 8 != 0 {
                return Err(BtfError::Bitfield(outer.to_string(), path.join(".")));
            }
            bits += off;
            last = Some(m);
            if i + 1 < path.len() {
                id = self.resolve(m.type_id).ok_or_else(missing)?;
            }
        }
        let m = last.ok_or_else(missing)?;
        Ok(Member {
            offset: bits / 8,
            size: self.size_of(m.type_id).ok_or_else(missing)?,
        })
    }

    /// The value of `value` in `enum name`.
    pub fn enum_value(&self, name: &str, value: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::NoEnumValue(name.to_string(), value.to_string());
        let id = *self.by_name.get(name).ok_or_else(missing)?;
        let ty = self
            .ty(id)
            .filter(|t| t.kind == KIND_ENUM)
            .ok_or_else(missing)?;
        ty.members
            .iter()
            .find(|m| self.name(m.name_off) == value)
            .map(|m| m.offset)
            .ok_or_else(missing)
    }

    /// Every `(name, value)` of `enum name`, in declaration order.
    pub fn enum_variants(&self, name: &str) -> Result<Vec<(String, u32)>, BtfError> {
        let missing = || BtfError::NoEnum(name.to_string());
        let id = *self.by_name.get(name).ok_or_else(missing)?;
        let ty = self
            .ty(id)
            .filter(|t| t.kind == KIND_ENUM)
            .ok_or_else(missing)?;
        Ok(ty
            .members
            .iter()
            .map(|m| (self.name(m.name_off).to_string(), m.offset))
            .collect())
    }

    /// Arguments of the BTF tracepoint `name` (from the `btf_trace_<name>` typedef), not counting
    /// the hidden context pointer.
    pub fn tracepoint_args(&self, name: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::NoTracepoint(name.to_string());
        let typedef = *self
            .by_name
            .get(&format!("btf_trace_{name}"))
            .ok_or_else(missing)?;
        let ptr = self.resolve(typedef).ok_or_else(missing)?;
        let ptr = self
            .ty(ptr)
            .filter(|t| t.kind == KIND_PTR)
            .ok_or_else(missing)?;
        let proto = self.resolve(ptr.size_or_type).ok_or_else(missing)?;
        let proto = self
            .ty(proto)
            .filter(|t| t.kind == KIND_FUNC_PROTO)
            .ok_or_else(missing)?;
        Ok(proto.params.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF with: int (4 bytes), struct inner { int a; int b; },
    /// struct outer { int x; union { int y; struct inner in; }; int arr[3]; int bf:3; }
    /// and typedef btf_trace_demo -> ptr -> proto(void*, int, int).
    fn sample() -> Vec<u8> {
        let mut strings =
            b"\0int\0inner\0a\0b\0outer\0x\0y\0in\0arr\0btf_trace_demo\0bf\0".to_vec();
        let s = |name: &str, strings: &[u8]| -> u32 {
            let needle = [name.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .map(|p| p as u32)
                .unwrap()
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                t.extend_from_slice(&w.to_le_bytes());
            }
        };
        let info = |kind: u32, vlen: u32, flag: bool| (kind << 24) | vlen | ((flag as u32) << 31);
        // 1: int
        push(&[s("int", &strings), info(KIND_INT, 0, false), 4, 32]);
        // 2: struct inner { a @0, b @32 }
        push(&[s("inner", &strings), info(KIND_STRUCT, 2, false), 8]);
        push(&[s("a", &strings), 1, 0, s("b", &strings), 1, 32]);
        // 3: anonymous union { y: int @0, in: inner @0 }
        push(&[0, info(KIND_UNION, 2, false), 8]);
        push(&[s("y", &strings), 1, 0, s("in", &strings), 2, 0]);
        // 4: int[3]
        push(&[0, info(KIND_ARRAY, 0, false), 0, 1, 1, 3]);
        // 5: struct outer (kind_flag: bitfield offsets) { x @0, <anon> @64, arr @128, bf:3 @224 }
        push(&[s("outer", &strings), info(KIND_STRUCT, 4, true), 32]);
        push(&[s("x", &strings), 1, 0, 0, 3, 64, s("arr", &strings), 4, 128]);
        push(&[s("bf", &strings), 1, (3 << 24) | 224]);
        // 6: func proto (void*, int, int); 7: ptr -> 6; 8: typedef btf_trace_demo -> 7
        push(&[0, info(KIND_FUNC_PROTO, 3, false), 0, 0, 0, 0, 1, 0, 1]);
        push(&[0, info(KIND_PTR, 0, false), 6]);
        push(&[
            s("btf_trace_demo", &strings),
            info(KIND_TYPEDEF, 0, false),
            7,
        ]);

        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&24u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&t);
        out.append(&mut strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_paths() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(
            btf.member("outer", &["x"]).unwrap(),
            Member { offset: 0, size: 4 }
        );
        assert_eq!(
            btf.member("outer", &["y"]).unwrap(),
            Member { offset: 8, size: 4 }
        );
        assert_eq!(
            btf.member("outer", &["in", "b"]).unwrap(),
            Member {
                offset: 12,
                size: 4
            }
        );
        assert_eq!(
            btf.member("outer", &["arr"]).unwrap(),
            Member {
                offset: 16,
                size: 12
            }
        );
        assert!(matches!(
            btf.member("outer", &["bf"]),
            Err(BtfError::Bitfield(..))
        ));
        assert!(matches!(
            btf.member("outer", &["nope"]),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member("nothing", &["x"]),
            Err(BtfError::NoStruct(..))
        ));
        assert_eq!(btf.tracepoint_args("demo").unwrap(), 2);
        assert!(matches!(
            btf.tracepoint_args("other"),
            Err(BtfError::NoTracepoint(..))
        ));
    }

    #[test]
    fn truncated_input_is_an_error() {
        let data = sample();
        for len in [0, 3, 23, data.len() - 1] {
            assert!(Btf::parse(&data[..len]).is_err(), "len {len}");
        }
    }

    /// The running kernel's BTF, where it exists (it does on every machine connprobe supports;
    /// the kernel tests need it anyway).
    #[test]
    fn reads_this_kernels_sock() {
        let Ok(btf) = Btf::from_file(Btf::VMLINUX) else {
            panic!(
                "no BTF at {}: connprobe's test machines have it",
                Btf::VMLINUX
            );
        };
        let family = btf.member("sock", &["__sk_common", "skc_family"]).unwrap();
        assert_eq!(family.size, 2);
        assert_eq!(btf.member("sock_common", &["skc_daddr"]).unwrap().offset, 0);
        assert_eq!(
            btf.member("sock_common", &["skc_rcv_saddr"])
                .unwrap()
                .offset,
            4
        );
        assert_eq!(btf.member("sock", &["sk_err"]).unwrap().size, 4);
        assert_eq!(btf.tracepoint_args("inet_sock_set_state").unwrap(), 3);
        assert_eq!(btf.enum_value("sock_flags", "SOCK_DEAD").unwrap(), 0);
        assert_eq!(btf.enum_value("sock_flags", "SOCK_DONE").unwrap(), 1);
        assert!(btf.enum_value("sock_flags", "SOCK_NOPE").is_err());
    }
}
