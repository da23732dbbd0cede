//! Reads the few kernel struct layouts the programs need from the kernel's
//! BTF (`/sys/kernel/btf/vmlinux`), so no offset is hard-coded and one
//! binary serves 6.1 (atomic RSS counters) and 6.2+ (per-CPU counters).
//!
//! Only the parts of the format needed to walk struct members are decoded
//! (see the kernel's Documentation/bpf/btf.rst).

use std::collections::HashMap;

use super::error::AgentError;

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

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// Size for INT/STRUCT/UNION/ENUM; referenced type for PTR/TYPEDEF/...
    size_or_type: u32,
    members: Vec<Member>,
    /// ARRAY: (element type, element count).
    array: Option<(u32, u32)>,
}

/// A parsed BTF blob.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

fn bad(reason: impl Into<String>) -> AgentError {
    AgentError::KernelLayout {
        reason: reason.into(),
    }
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, AgentError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| bad(format!("BTF truncated at byte {at}")))
}

impl Btf {
    /// Parses little-endian BTF.
    pub fn parse(data: &[u8]) -> Result<Self, AgentError> {
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(MAGIC) {
            return Err(bad("not little-endian BTF (bad magic)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let tsec = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| bad("BTF type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| bad("BTF string section out of bounds"))?
            .to_vec();
        // Type id 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
            array: None,
        }];
        let mut at = 0;
        while at < tsec.len() {
            let name = u32_at(tsec, at)?;
            let info = u32_at(tsec, at + 4)?;
            let size_or_type = u32_at(tsec, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                name,
                kind,
                size_or_type,
                members: Vec::new(),
                array: None,
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => {
                    ty.array = Some((u32_at(tsec, at)?, u32_at(tsec, at + 8)?));
                    at += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let offset = u32_at(tsec, at + 8)?;
                        ty.members.push(Member {
                            name: u32_at(tsec, at)?,
                            ty: u32_at(tsec, at + 4)?,
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                other => return Err(bad(format!("unknown BTF kind {other}"))),
            }
            types.push(ty);
        }
        let mut btf = Self {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() as u32 {
            let t = &btf.types[id as usize];
            if matches!(t.kind, KIND_STRUCT | KIND_UNION) && t.name != 0 {
                let name = btf.name(t.name).to_owned();
                btf.by_name.entry(name).or_default().push(id);
            }
        }
        Ok(btf)
    }

    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, AgentError> {
        Self::from_path(std::path::Path::new(super::paths::VMLINUX_BTF))
    }

    /// BTF from a file (a kernel without `CONFIG_DEBUG_INFO_BTF` has none).
    pub fn from_path(path: &std::path::Path) -> Result<Self, AgentError> {
        let data = std::fs::read(path).map_err(|_| AgentError::NoBtf { path: path.into() })?;
        Self::parse(&data)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Result<&Type, AgentError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| bad(format!("BTF type id {id} out of range")))
    }

    /// Strips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Result<u32, AgentError> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(bad("BTF typedef chain too long"))
    }

    /// Size in bytes of type `id`.
    pub fn size_of(&self, id: u32) -> Result<u32, AgentError> {
        let id = self.resolve(id)?;
        let t = self.ty(id)?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Ok(t.size_or_type)
            }
            KIND_PTR => Ok(8),
            KIND_ARRAY => {
                let (elem, n) = t.array.unwrap_or((0, 0));
                Ok(self.size_of(elem)? * n)
            }
            k => Err(bad(format!("no size for BTF kind {k}"))),
        }
    }

    /// A complete struct by name (forward declarations have no members).
    pub fn struct_id(&self, name: &str) -> Result<u32, AgentError> {
        self.by_name
            .get(name)
            .and_then(|ids| {
                ids.iter()
                    .copied()
                    .find(|&id| self.types[id as usize].kind == KIND_STRUCT)
            })
            .ok_or_else(|| bad(format!("kernel BTF has no struct {name}")))
    }

    /// Byte offset and type of member `name` of struct/union `id`, looking
    /// through anonymous struct and union members.
    pub fn member(&self, id: u32, name: &str) -> Result<(u32, u32), AgentError> {
        self.find_member(self.resolve(id)?, name, 0)?
            .ok_or_else(|| {
                bad(format!(
                    "{} has no member {name}",
                    self.name(self.types[id as usize].name)
                ))
            })
    }

    fn find_member(
        &self,
        id: u32,
        name: &str,
        base_bits: u32,
    ) -> Result<Option<(u32, u32)>, AgentError> {
        let t = self.ty(id)?;
        for m in &t.members {
            let bits = base_bits + m.bit_offset;
            if m.name != 0 && self.name(m.name) == name {
                return Ok(Some((bits / 8, m.ty)));
            }
            if m.name == 0 {
                let inner = self.resolve(m.ty)?;
                if matches!(self.ty(inner)?.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find_member(inner, name, bits)?
                {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// Element type and count if `id` is an array.
    pub fn array(&self, id: u32) -> Result<Option<(u32, u32)>, AgentError> {
        Ok(self.ty(self.resolve(id)?)?.array)
    }

    /// Resolved kind of `id` is a struct.
    pub fn is_struct(&self, id: u32) -> Result<bool, AgentError> {
        Ok(self.ty(self.resolve(id)?)?.kind == KIND_STRUCT)
    }
}

/// Where an address space's RSS counters live, for the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RssLayout {
    /// Offset of the first counter's value in `struct mm_struct`.
    pub first_counter: u32,
    /// Distance between consecutive counters.
    pub stride: u32,
    /// Offset of `mm` in `struct task_struct`.
    pub task_mm: u32,
    /// Offset of the first counter's per-CPU part pointer
    /// (`percpu_counter.counters`, 6.2+; the others follow at `stride`).
    pub first_cpu_part: Option<u32>,
}

/// Finds the RSS counters in `mm_struct`:
/// * 6.2+: `struct percpu_counter rss_stat[NR_MM_COUNTERS]`; we read each
///   counter's central `count` and the running CPU's part (`counters`, a
///   per-CPU pointer), whose changes together are each change's amount
///   (see `nodedb_governor_common::CpuParts`);
/// * up to 6.1: `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }`.
pub fn rss_layout(btf: &Btf) -> Result<RssLayout, AgentError> {
    let mm = btf.struct_id("mm_struct")?;
    let (rss_off, rss_ty) = btf.member(mm, "rss_stat")?;
    let (first_counter, stride, first_cpu_part) = if let Some((elem, _n)) = btf.array(rss_ty)? {
        // percpu_counter[]: value is `count`, this CPU's part at `counters`.
        let (count_off, _) = btf.member(elem, "count")?;
        let (part_off, _) = btf.member(elem, "counters")?;
        (
            rss_off + count_off,
            btf.size_of(elem)?,
            Some(rss_off + part_off),
        )
    } else if btf.is_struct(rss_ty)? {
        // mm_rss_stat { atomic_long_t count[]; }
        let (count_off, count_ty) = btf.member(rss_ty, "count")?;
        let (elem, _) = btf
            .array(count_ty)?
            .ok_or_else(|| bad("mm_rss_stat.count is not an array"))?;
        (rss_off + count_off, btf.size_of(elem)?, None)
    } else {
        return Err(bad("mm_struct.rss_stat is neither an array nor a struct"));
    };
    if stride < 8 {
        return Err(bad(format!(
            "RSS counter stride {stride} is smaller than a counter"
        )));
    }
    let task = btf.struct_id("task_struct")?;
    let (task_mm, _) = btf.member(task, "mm")?;
    Ok(RssLayout {
        first_counter,
        stride,
        task_mm,
        first_cpu_part,
    })
}

/// Offset of `pptrs` in `struct bpf_array` (through its anonymous union
/// and, from 6.4, `DECLARE_FLEX_ARRAY`'s anonymous struct): where a
/// per-CPU array map keeps its entries' per-CPU pointers.
pub fn bpf_array_pptrs(btf: &Btf) -> Result<u32, AgentError> {
    let array = btf.struct_id("bpf_array")?;
    Ok(btf.member(array, "pptrs")?.0)
}

/// Offset of `flags` in `struct task_struct` (the eBPF side tests
/// `PF_MEMALLOC` there to tell reclaim from other page-cache removals).
pub fn task_flags(btf: &Btf) -> Result<u32, AgentError> {
    let task = btf.struct_id("task_struct")?;
    Ok(btf.member(task, "flags")?.0)
}

/// Offsets of `min_flt` and `maj_flt` in `struct task_struct` (each an
/// `unsigned long`, counted when a fault finishes).
pub fn task_fault_counts(btf: &Btf) -> Result<(u32, u32), AgentError> {
    let task = btf.struct_id("task_struct")?;
    Ok((
        btf.member(task, "min_flt")?.0,
        btf.member(task, "maj_flt")?.0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words).
    fn blob(strings: &[&str], types: &[(u32, u32, u32, Vec<u32>)]) -> Vec<u8> {
        let mut str_sec = vec![0u8];
        let mut offs = Vec::new();
        for s in strings {
            offs.push(str_sec.len() as u32);
            str_sec.extend_from_slice(s.as_bytes());
            str_sec.push(0);
        }
        let mut tsec = Vec::new();
        for (name, info, sz, extra) in types {
            let name = if *name == 0 {
                0
            } else {
                offs[*name as usize - 1]
            };
            for w in [name, *info, *sz].iter().chain(extra.iter()) {
                tsec.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            tsec.len() as u32,
            tsec.len() as u32,
            str_sec.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&tsec);
        out.extend_from_slice(&str_sec);
        out
    }

    fn strukt(vlen: u32) -> u32 {
        (KIND_STRUCT << 24) | vlen
    }

    /// Member name indexes are 1-based positions in `strings`; the
    /// resolved string offset is patched in by `member_words`.
    fn layout_6_2() -> Vec<u8> {
        // strings: 1 mm_struct 2 rss_stat 3 percpu_counter 4 count 5 long
        //          6 task_struct 7 mm 8 lock 9 counters
        let strings = [
            "mm_struct",
            "rss_stat",
            "percpu_counter",
            "count",
            "long",
            "task_struct",
            "mm",
            "lock",
            "counters",
        ];
        let off = |i: usize| -> u32 {
            1 + strings[..i - 1]
                .iter()
                .map(|s| s.len() as u32 + 1)
                .sum::<u32>()
        };
        let types = vec![
            // 1: long
            (5, KIND_INT << 24, 8, vec![64]),
            // 2: struct percpu_counter { lock @0 (long), count @8 (long),
            //    counters @32 (long: a per-CPU pointer) } size 40
            (
                3,
                strukt(3),
                40,
                vec![off(8), 1, 0, off(4), 1, 64, off(9), 1, 256],
            ),
            // 3: percpu_counter[4]
            (0, KIND_ARRAY << 24, 0, vec![2, 1, 4]),
            // 4: anonymous struct { rss_stat @ 128 bytes }
            (0, strukt(1), 512, vec![off(2), 3, 128 * 8]),
            // 5: mm_struct { <anon> @ 64 bytes }
            (1, strukt(1), 1024, vec![0, 4, 64 * 8]),
            // 6: ptr to mm_struct
            (0, KIND_PTR << 24, 5, vec![]),
            // 7: task_struct { mm @ 900 }
            (6, strukt(1), 4096, vec![off(7), 6, 900 * 8]),
        ];
        blob(&strings, &types)
    }

    #[test]
    fn finds_per_cpu_rss_counters_through_anonymous_members() {
        let btf = Btf::parse(&layout_6_2()).expect("parse");
        let l = rss_layout(&btf).expect("layout");
        assert_eq!(l.first_counter, 64 + 128 + 8);
        assert_eq!(l.first_cpu_part, Some(64 + 128 + 32));
        assert_eq!(l.stride, 40);
        assert_eq!(l.task_mm, 900);
    }

    #[test]
    fn rejects_garbage_and_names_missing_structs() {
        assert!(Btf::parse(b"nope").is_err());
        let btf = Btf::parse(&layout_6_2()).unwrap();
        let e = btf.struct_id("vm_area_struct").unwrap_err().to_string();
        assert!(e.contains("vm_area_struct"), "{e}");
    }

    #[test]
    fn a_kernel_without_btf_is_named() {
        let e = Btf::from_path(std::path::Path::new("/nonexistent/vmlinux"))
            .err()
            .expect("no BTF");
        let msg = e.to_string();
        assert!(
            msg.contains("BTF is missing") && msg.contains("CONFIG_DEBUG_INFO_BTF"),
            "{msg}"
        );
    }

    #[test]
    fn reads_the_running_kernels_layout() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipping reads_the_running_kernels_layout: no readable kernel BTF");
            return;
        };
        let l = rss_layout(&btf).expect("this kernel's mm_struct layout");
        assert!(
            l.stride >= 8 && l.first_counter > 0 && l.task_mm > 0,
            "{l:?}"
        );
        // A per-CPU part where the counters are `percpu_counter`s (6.2+),
        // and the per-CPU array's pointers the programs find it through.
        if btf
            .array(
                btf.member(btf.struct_id("mm_struct").unwrap(), "rss_stat")
                    .unwrap()
                    .1,
            )
            .unwrap()
            .is_some()
        {
            assert!(l.first_cpu_part.is_some(), "{l:?}");
            assert!(bpf_array_pptrs(&btf).expect("bpf_array.pptrs") > 0);
        }
    }
}
