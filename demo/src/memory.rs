//! Memory an engine holds, with its ground truth: every byte counted here
//! has been touched, so it is resident.

use std::{fs::File, os::fd::AsRawFd, ptr::NonNull};

pub const PAGE: usize = 4096;
pub const MIB: usize = 1 << 20;

/// How a block of memory was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Private anonymous mmap.
    Anon,
    /// The process's allocator (glibc malloc here).
    Malloc,
    /// A shared mapping of a file on disk, read page by page.
    File,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmap" | "anon" => Ok(Kind::Anon),
            "malloc" => Ok(Kind::Malloc),
            "file" => Ok(Kind::File),
            other => Err(format!(
                "unknown memory kind {other:?} (mmap, malloc, file)"
            )),
        }
    }
}

/// A touched block. Dropping it gives the memory back (munmap or free).
pub struct Block {
    ptr: NonNull<u8>,
    len: usize,
    kind: Kind,
    /// Still resident (false after MADV_DONTNEED).
    resident: bool,
}

// SAFETY: a Block owns its memory exclusively; moving it to another thread
// moves that ownership (the point of the cross-engine release tests).
unsafe impl Send for Block {}

impl Block {
    /// Maps and touches `len` bytes of `kind`, on the calling thread.
    pub fn new(kind: Kind, len: usize) -> std::io::Result<Self> {
        let len = len.div_ceil(PAGE) * PAGE;
        let ptr = match kind {
            Kind::Anon => map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?,
            Kind::Malloc => {
                // SAFETY: plain allocation; checked for null below.
                let p = unsafe { libc::malloc(len) } as *mut u8;
                NonNull::new(p).ok_or_else(std::io::Error::last_os_error)?
            }
            Kind::File => {
                let path = std::env::temp_dir().join(format!(
                    "nodedb-probe-{}-{:x}",
                    std::process::id(),
                    next_id()
                ));
                let file = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
                std::fs::remove_file(&path)?;
                file.set_len(len as u64)?;
                map(len, libc::MAP_SHARED, file.as_raw_fd())?
            }
        };
        let block = Self {
            ptr,
            len,
            kind,
            resident: true,
        };
        block.touch();
        Ok(block)
    }

    /// Maps `len` bytes of private anonymous memory without touching
    /// them: a pool's reservation, resident only once some thread faults
    /// it in ([`Block::fault_in`]), possibly not the one that mapped it.
    pub fn reserve(len: usize) -> std::io::Result<Self> {
        let len = len.div_ceil(PAGE) * PAGE;
        Ok(Self {
            ptr: map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?,
            len,
            kind: Kind::Anon,
            resident: false,
        })
    }

    /// Maps `len` bytes of private anonymous memory at `addr`, over what
    /// was mapped there (a `PROT_NONE` reservation of the caller's), and
    /// touches them on the calling thread.
    ///
    /// # Safety
    /// `addr..addr+len` must be page aligned and mapped by the caller for
    /// this purpose (nothing else may use it).
    pub unsafe fn new_at(addr: usize, len: usize) -> std::io::Result<Self> {
        // SAFETY: the caller's reservation, replaced in place.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let block = Self {
            ptr: NonNull::new(p as *mut u8).expect("MAP_FIXED at a non-null address"),
            len,
            kind: Kind::Anon,
            resident: true,
        };
        block.touch();
        Ok(block)
    }

    /// Asks for transparent huge pages (`MADV_HUGEPAGE`): where a whole
    /// aligned 2 MiB of the block is faulted in at once, one fault brings
    /// it all, as under the kernel's `always` setting.
    pub fn advise_huge_pages(&self) -> std::io::Result<()> {
        // SAFETY: advice on the block's own mapping.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_HUGEPAGE) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Touches every page, on the calling thread.
    pub fn fault_in(&mut self) {
        self.touch();
        self.resident = true;
    }

    /// Takes ownership of a touched region mapped elsewhere.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a private mapping (for [`Kind::Anon`]) that
    /// nothing else unmaps.
    pub unsafe fn adopt(ptr: *mut u8, len: usize, kind: Kind) -> Self {
        Self {
            ptr: NonNull::new(ptr).expect("null region"),
            len,
            kind,
            resident: true,
        }
    }

    fn touch(&self) {
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: off < len, inside the mapping we own.
            unsafe {
                let p = self.ptr.as_ptr().add(off);
                if self.kind == Kind::File {
                    std::ptr::read_volatile(p);
                } else {
                    std::ptr::write_volatile(p, 1);
                }
            }
        }
    }

    /// Reads one byte of every page, on the calling thread (a reader of
    /// memory it does not own); returns their sum.
    pub fn read_pages(&self) -> u64 {
        let mut sum = 0u64;
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: off < len, inside the mapping we own.
            sum += u64::from(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off)) });
        }
        sum
    }

    /// Where the block starts.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn resident_bytes(&self) -> usize {
        if self.resident { self.len } else { 0 }
    }

    /// Splits off the first `len` bytes (page-aligned) as a block of their
    /// own. Only for mappings: an allocator block cannot be split.
    pub fn split_front(&mut self, len: usize) -> Option<Block> {
        let len = len.div_ceil(PAGE) * PAGE;
        if self.kind == Kind::Malloc || len >= self.len {
            return None;
        }
        let front = Block {
            ptr: self.ptr,
            len,
            kind: self.kind,
            resident: self.resident,
        };
        // SAFETY: len < self.len, so the new start is inside the mapping.
        self.ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(len)) };
        self.len -= len;
        Some(front)
    }

    /// MADV_DONTNEED: the range stays mapped but is no longer resident.
    pub fn dont_need(&mut self) -> std::io::Result<()> {
        if self.kind == Kind::Malloc {
            return Err(std::io::Error::other("madvise on an allocator block"));
        }
        // SAFETY: the range is a mapping this block owns.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.resident = false;
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: the block owns exactly this allocation or mapping.
        unsafe {
            match self.kind {
                Kind::Malloc => libc::free(self.ptr.as_ptr().cast()),
                Kind::Anon | Kind::File => {
                    libc::munmap(self.ptr.as_ptr().cast(), self.len);
                }
            }
        }
    }
}

fn map(len: usize, flags: i32, fd: i32) -> std::io::Result<NonNull<u8>> {
    let prot = if fd >= 0 {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    // SAFETY: a fresh mapping at an address of the kernel's choosing.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(p as *mut u8).ok_or_else(|| std::io::Error::other("mmap returned null"))
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Makes glibc malloc serve large blocks from its per-thread arenas rather
/// than from fresh mmaps, so "the allocator" really is the allocator, and
/// returns freed pages promptly.
pub fn configure_malloc() {
    // SAFETY: mallopt has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * MIB as i32);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// Gives free allocator pages back to the kernel (MADV_DONTNEED), as a
/// database does after a large free.
pub fn trim_malloc() {
    // SAFETY: no preconditions.
    unsafe { libc::malloc_trim(0) };
}
