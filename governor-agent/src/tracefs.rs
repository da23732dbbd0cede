//! tracefs: mounting it when missing, and reading tracepoint `format` files.
//!
//! Classic tracepoint records have a layout the kernel is free to change, so
//! the programs never hard-code an offset: [`trace_offsets`] reads them here
//! at load time and the loader writes them into the programs' read-only data.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use nodedb_governor_common::{TraceOffsets, kind};

use super::{error::AgentError, mounts};

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// A parsed `format` file.
#[derive(Clone, Debug, Default)]
pub struct Format {
    pub fields: HashMap<String, Field>,
    pub print_fmt: String,
}

/// What is wrong with a line of a tracefs `format` file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad field line {line:?}")]
    Field { line: String },
    #[error("no field name in {line:?}")]
    NoName { line: String },
    #[error("bad offset in {line:?}")]
    Offset { line: String },
    #[error("bad size in {line:?}")]
    Size { line: String },
    #[error("no offset in {line:?}")]
    NoOffset { line: String },
}

impl Format {
    /// Parses the text of a tracefs `format` file.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let mut format = Format::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("print fmt:") {
                format.print_fmt = rest.trim().to_owned();
                continue;
            }
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            // "unsigned int mm_id;\toffset:8;\tsize:4;\tsigned:0;"
            let mut parts = rest.split(';').map(str::trim);
            let owned = || line.to_owned();
            let decl = parts
                .next()
                .ok_or_else(|| FormatError::Field { line: owned() })?;
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .map(|n| n.split('[').next().unwrap_or(n))
                .filter(|n| !n.is_empty())
                .ok_or_else(|| FormatError::NoName { line: owned() })?;
            let mut field = Field {
                offset: u32::MAX,
                size: 0,
                signed: false,
            };
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    field.offset = v
                        .parse()
                        .map_err(|_| FormatError::Offset { line: owned() })?;
                } else if let Some(v) = part.strip_prefix("size:") {
                    field.size = v.parse().map_err(|_| FormatError::Size { line: owned() })?;
                } else if let Some(v) = part.strip_prefix("signed:") {
                    field.signed = v == "1";
                }
            }
            if field.offset == u32::MAX {
                return Err(FormatError::NoOffset { line: owned() });
            }
            format.fields.insert(name.to_owned(), field);
        }
        Ok(format)
    }

    /// Offset of `name`, checking its size.
    pub fn offset(&self, event: &str, name: &str, size: u32) -> Result<u32, AgentError> {
        let field = self
            .fields
            .get(name)
            .ok_or_else(|| AgentError::TraceFormat {
                event: event.to_owned(),
                reason: format!("no field `{name}`"),
            })?;
        if field.size != size {
            return Err(AgentError::TraceFormat {
                event: event.to_owned(),
                reason: format!("field `{name}` is {} bytes, expected {size}", field.size),
            });
        }
        Ok(field.offset)
    }

    /// The `{ value, "NAME" }` pairs of a `__print_symbolic` in the print
    /// format, e.g. the `MM_*` counter numbers of `rss_stat`.
    pub fn symbols(&self) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        let mut rest = self.print_fmt.as_str();
        while let Some(open) = rest.find('{') {
            rest = &rest[open + 1..];
            let Some(close) = rest.find('}') else { break };
            let inner = &rest[..close];
            rest = &rest[close + 1..];
            let mut it = inner.splitn(2, ',');
            let (Some(value), Some(name)) = (it.next(), it.next()) else {
                continue;
            };
            let value = value.trim();
            let parsed = if let Some(hex) = value.strip_prefix("0x") {
                u32::from_str_radix(hex, 16).ok()
            } else {
                value.parse().ok()
            };
            if let Some(v) = parsed {
                out.insert(name.trim().trim_matches('"').to_owned(), v);
            }
        }
        out
    }
}

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct TraceFs {
    root: PathBuf,
}

impl TraceFs {
    /// Finds tracefs, mounting it at [`super::paths::TRACEFS`] when it is not
    /// mounted anywhere (saying so).
    pub fn find_or_mount() -> Result<Self, AgentError> {
        for candidate in [super::paths::TRACEFS, super::paths::TRACEFS_LEGACY] {
            if Path::new(candidate).join("events").is_dir() {
                return Ok(Self {
                    root: candidate.into(),
                });
            }
        }
        tracing::warn!(
            path = super::paths::TRACEFS,
            "tracefs is not mounted; mounting it"
        );
        mounts::mount_pseudo("tracefs", super::paths::TRACEFS).map_err(|source| {
            AgentError::NoTracefs {
                path: super::paths::TRACEFS.into(),
                source,
            }
        })?;
        Ok(Self {
            root: super::paths::TRACEFS.into(),
        })
    }

    /// A tracefs mounted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Reads and parses `events/<category>/<name>/format`.
    pub fn format(&self, category: &str, name: &str) -> Result<Format, AgentError> {
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|source| AgentError::Io {
            what: format!("reading tracepoint format {}", path.display()),
            source,
        })?;
        Format::parse(&text).map_err(|e| AgentError::TraceFormat {
            event: format!("{category}/{name}"),
            reason: e.to_string(),
        })
    }
}

/// Builds the offsets the programs need from this kernel's format files.
pub fn trace_offsets(tracefs: &TraceFs) -> Result<TraceOffsets, AgentError> {
    let munmap = tracefs.format("syscalls", "sys_enter_munmap")?;
    let madvise = tracefs.format("syscalls", "sys_enter_madvise")?;
    let brk = tracefs.format("syscalls", "sys_enter_brk")?;
    let mmap = tracefs.format("syscalls", "sys_enter_mmap")?;
    let fork = tracefs.format("sched", "sched_process_fork")?;
    // The add and delete events share one class, so one layout: checked.
    let mut filemap = None;
    for event in [
        "mm_filemap_add_to_page_cache",
        "mm_filemap_delete_from_page_cache",
    ] {
        let f = tracefs.format("filemap", event)?;
        let fields = (
            f.offset(event, "i_ino", 8)?,
            f.offset(event, "s_dev", 4)?,
            f.offset(event, "order", 1)?,
        );
        if *filemap.get_or_insert(fields) != fields {
            return Err(AgentError::TraceFormat {
                event: event.to_owned(),
                reason: "its fields are not where mm_filemap_add_to_page_cache has them".into(),
            });
        }
    }
    let (filemap_ino, filemap_dev, filemap_order) = filemap.unwrap_or_default();
    let mut exit_ret = None;
    for name in ["munmap", "madvise", "brk", "mmap"] {
        let event = format!("sys_exit_{name}");
        let offset = tracefs
            .format("syscalls", &event)?
            .offset(&event, "ret", 8)?;
        if *exit_ret.get_or_insert(offset) != offset {
            return Err(AgentError::TraceFormat {
                event,
                reason: "`ret` is not at the same offset in every sys_exit record".into(),
            });
        }
    }
    Ok(TraceOffsets {
        munmap_addr: munmap.offset("sys_enter_munmap", "addr", 8)?,
        munmap_len: munmap.offset("sys_enter_munmap", "len", 8)?,
        madvise_start: madvise.offset("sys_enter_madvise", "start", 8)?,
        madvise_len: madvise.offset("sys_enter_madvise", "len_in", 8)?,
        brk_brk: brk.offset("sys_enter_brk", "brk", 8)?,
        mmap_len: mmap.offset("sys_enter_mmap", "len", 8)?,
        sys_exit_ret: exit_ret.unwrap_or(16),
        fork_parent_pid: fork.offset("sched_process_fork", "parent_pid", 4)?,
        fork_child_pid: fork.offset("sched_process_fork", "child_pid", 4)?,
        filemap_ino,
        filemap_dev,
        filemap_order,
        _pad: 0,
    })
}

/// Maps the kernel's `MM_*` counter numbers onto our [`kind`] buckets.
pub fn member_kinds(rss: &Format) -> Result<[u8; 8], AgentError> {
    let symbols = rss.symbols();
    let mut kinds = [kind::UNKNOWN; 8];
    for (name, bucket) in [
        ("MM_FILEPAGES", kind::FILE),
        ("MM_ANONPAGES", kind::ANON),
        ("MM_SWAPENTS", kind::SWAP),
        ("MM_SHMEMPAGES", kind::SHMEM),
    ] {
        let value = symbols.get(name).ok_or_else(|| AgentError::TraceFormat {
            event: "kmem/rss_stat".into(),
            reason: format!("print format does not name {name}"),
        })?;
        let slot = kinds
            .get_mut(*value as usize)
            .ok_or_else(|| AgentError::TraceFormat {
                event: "kmem/rss_stat".into(),
                reason: format!("{name} = {value} is out of range"),
            })?;
        *slot = bucket as u8;
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS_STAT: &str = r#"name: rss_stat
ID: 497
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:unsigned int mm_id;	offset:8;	size:4;	signed:0;
	field:unsigned int curr;	offset:12;	size:4;	signed:0;
	field:int member;	offset:16;	size:4;	signed:1;
	field:long size;	offset:24;	size:8;	signed:1;

print fmt: "mm_id=%u curr=%d type=%s size=%ldB", REC->mm_id, REC->curr, __print_symbolic(REC->member, { 0, "MM_FILEPAGES" }, { 1, "MM_ANONPAGES" }, { 2, "MM_SWAPENTS" }, { 3, "MM_SHMEMPAGES" }), REC->size
"#;

    #[test]
    fn parses_rss_stat_fields_and_counter_names() {
        let f = Format::parse(RSS_STAT).expect("parse");
        assert_eq!(f.offset("rss_stat", "mm_id", 4).unwrap(), 8);
        assert_eq!(f.offset("rss_stat", "size", 8).unwrap(), 24);
        assert!(f.fields["size"].signed);
        let kinds = member_kinds(&f).expect("kinds");
        assert_eq!(kinds[0], kind::FILE as u8);
        assert_eq!(kinds[1], kind::ANON as u8);
        assert_eq!(kinds[3], kind::SHMEM as u8);
        assert_eq!(kinds[4], kind::UNKNOWN);
    }

    #[test]
    fn renumbered_counters_follow_the_print_format() {
        let text = RSS_STAT.replace(
            "{ 0, \"MM_FILEPAGES\" }, { 1, \"MM_ANONPAGES\" }",
            "{ 1, \"MM_FILEPAGES\" }, { 0, \"MM_ANONPAGES\" }",
        );
        let kinds = member_kinds(&Format::parse(&text).unwrap()).unwrap();
        assert_eq!(kinds[0], kind::ANON as u8);
        assert_eq!(kinds[1], kind::FILE as u8);
    }

    #[test]
    fn wrong_field_size_and_missing_field_are_named() {
        let f = Format::parse(RSS_STAT).unwrap();
        let err = f.offset("rss_stat", "size", 4).unwrap_err().to_string();
        assert!(
            err.contains("rss_stat") && err.contains("`size` is 8 bytes"),
            "{err}"
        );
        let err = f.offset("rss_stat", "nope", 4).unwrap_err().to_string();
        assert!(err.contains("no field `nope`"), "{err}");
        let missing = Format::parse(&RSS_STAT.replace("MM_SHMEMPAGES", "MM_OTHER")).unwrap();
        let err = member_kinds(&missing).unwrap_err().to_string();
        assert!(err.contains("MM_SHMEMPAGES"), "{err}");
    }

    #[test]
    fn a_missing_tracepoint_is_named() {
        let e = trace_offsets(&TraceFs::at("/nonexistent-tracefs"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sys_enter_munmap/format"), "{e}");
    }
}
