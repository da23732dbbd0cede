//! The uncached writer: what it writes reads back exactly, and does not
//! stay in the page cache (a plain buffered write of the same data does,
//! measured beside it); the path it takes is the one the kernel and the
//! filesystem allow; `drop_cached` empties a file's cache.
//!
//! The files live under cargo's target directory (a block filesystem on
//! our machines: tmpfs pages cannot be dropped, which the detection test
//! uses instead).

use std::{
    fs::{self, File},
    io::{Read, Write},
    path::PathBuf,
};

use nodedb_governor::{
    UncachedWriter, WritePath,
    page_cache::{self, drop_cached, resident_bytes},
};

const MIB: u64 = 1 << 20;

/// Under cargo's target directory, or, where the test binary runs away
/// from it (the VMs), under `NODEDB_GOVERNOR_TEST_DISK_DIR`.
fn scratch(name: &str) -> PathBuf {
    let base = std::env::var_os("NODEDB_GOVERNOR_TEST_DISK_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    let dir = base.join("page_cache");
    fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}", std::process::id()))
}

/// Deterministic bytes that differ at every offset (a shifted or lost
/// piece shows).
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` in pieces of an awkward size (not a divisor of the
/// chunk), checking the cache's share of the file after each piece with
/// `during` (file offset, resident bytes).
fn write_in_pieces(w: &mut UncachedWriter, data: &[u8], mut during: impl FnMut(u64, u64)) {
    for piece in data.chunks(777_777) {
        w.write_all(piece).unwrap();
        let (resident, _) = resident_bytes(w.file()).unwrap();
        during(w.written_bytes(), resident);
    }
}

fn read_back(path: &PathBuf) -> Vec<u8> {
    let mut back = Vec::new();
    File::open(path).unwrap().read_to_end(&mut back).unwrap();
    back
}

/// The kernel's own behaviour, measured in the same test: a plain
/// buffered write of `len` bytes stays cached. Without this the writers'
/// empty caches would prove nothing.
fn buffered_write_stays_cached(len: usize) {
    let path = scratch("buffered");
    let mut f = File::create(&path).unwrap();
    f.write_all(&pattern(len)).unwrap();
    f.sync_data().unwrap();
    let (resident, size) = resident_bytes(&f).unwrap();
    assert_eq!(size, len as u64);
    assert!(
        resident >= size * 9 / 10,
        "a plain buffered write of {} MiB left only {} MiB cached: the comparison means nothing",
        size / MIB,
        resident / MIB
    );
    // drop_cached writes back and drops it, and says how much was there.
    // Two readings of the cache: writeback or reclaim may move it a little
    // in between.
    let dropped = drop_cached(&f).unwrap();
    assert!(
        dropped.abs_diff(resident) <= MIB,
        "drop_cached saw {dropped} bytes cached, mincore {resident}"
    );
    let (after, _) = resident_bytes(&f).unwrap();
    assert!(
        after <= MIB,
        "drop_cached left {} KiB of a {} MiB file cached",
        after >> 10,
        size / MIB
    );
    fs::remove_file(&path).unwrap();
}

#[test]
fn the_detected_path_leaves_nothing_cached_and_reads_back_exactly() {
    let len = 48 * MIB as usize;
    buffered_write_stays_cached(len);
    let data = pattern(len);
    let path = scratch("detected");
    let mut w = UncachedWriter::create(&path).unwrap();
    assert_eq!(w.path(), None, "the path is chosen by the first write");
    write_in_pieces(&mut w, &data, |_, _| {});
    let (file, taken) = w.finish().unwrap();
    let expected = page_cache::probe(path.parent().unwrap()).unwrap();
    assert_eq!(taken, expected, "the writer and the probe disagree");
    let (resident, size) = resident_bytes(&file).unwrap();
    assert_eq!(size, len as u64);
    assert!(
        resident <= MIB,
        "{taken}: {} KiB of the {} MiB written are still cached",
        resident >> 10,
        size / MIB
    );
    assert!(
        read_back(&path) == data,
        "{taken}: the file differs from what was written"
    );
    fs::remove_file(&path).unwrap();
}

#[test]
fn write_behind_keeps_at_most_its_window_cached_while_it_writes() {
    let len = 64 * MIB as usize;
    let (chunk, window) = (MIB as usize, 8 * MIB);
    let data = pattern(len);
    let path = scratch("write-behind");
    let mut w = UncachedWriter::with_path(File::create(&path).unwrap(), WritePath::WriteBehind)
        .unwrap()
        .sizes(chunk, window);
    let mut most = 0;
    write_in_pieces(&mut w, &data, |at, resident| {
        most = most.max(resident);
        // The window, the chunk being written and the buffered piece.
        assert!(
            resident <= window + 2 * chunk as u64,
            "at {} MiB written, {} MiB cached: more than the window ({} MiB) and a chunk",
            at / MIB,
            resident / MIB,
            window / MIB
        );
    });
    assert!(
        most >= window / 2,
        "at most {} MiB were ever cached: the write-behind never let the window fill (the check measures nothing)",
        most / MIB
    );
    let (file, taken) = w.finish().unwrap();
    assert_eq!(taken, WritePath::WriteBehind);
    let (resident, _) = resident_bytes(&file).unwrap();
    assert!(
        resident <= MIB,
        "{} KiB cached after finish",
        resident >> 10
    );
    assert!(
        read_back(&path) == data,
        "the file differs from what was written"
    );
    fs::remove_file(&path).unwrap();
}

#[test]
fn a_writer_appends_after_what_the_file_held() {
    let path = scratch("append");
    fs::write(&path, b"header:").unwrap();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut w = UncachedWriter::new(f).unwrap();
    w.write_all(b"first,").unwrap();
    w.flush().unwrap();
    w.write_all(b"second").unwrap();
    drop(w); // writes the rest, as a BufWriter would
    assert_eq!(fs::read(&path).unwrap(), b"header:first,second");
    fs::remove_file(&path).unwrap();
}

/// `RWF_DONTCACHE` came in Linux 6.14 and only for filesystems that opt
/// in (xfs from 6.15, ext4 from 6.17); tmpfs does not (its pages have nowhere to be written back to).
#[test]
fn the_path_is_the_one_the_kernel_and_filesystem_allow() {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        assert_eq!(
            page_cache::probe(shm).unwrap(),
            WritePath::WriteBehind,
            "tmpfs takes no RWF_DONTCACHE"
        );
        // And a writer there falls back on its first chunk, losing nothing.
        let path = shm.join(format!("nodedb-governor-test-{}", std::process::id()));
        let data = pattern(3 * MIB as usize + 5);
        let mut w = UncachedWriter::create(&path).unwrap();
        w.write_all(&data).unwrap();
        let (_, taken) = w.finish().unwrap();
        assert_eq!(taken, WritePath::WriteBehind);
        assert!(
            fs::read(&path).unwrap() == data,
            "the fallback lost or moved data"
        );
        fs::remove_file(&path).unwrap();
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .map(|n| n.parse().unwrap())
        .collect();
    let (major, minor) = (version[0], version[1]);
    let dir = scratch("probe");
    let dir = dir.parent().unwrap();
    let magic = fs_magic(dir);
    let taken = page_cache::probe(dir).unwrap();
    if (major, minor) < (6, 14) {
        assert_eq!(
            taken,
            WritePath::WriteBehind,
            "Linux {release} has no RWF_DONTCACHE"
        );
    }
    // xfs takes it from 6.15 on, ext4 from 6.17.
    const EXT4: libc::__fsword_t = 0xEF53;
    const XFS: libc::__fsword_t = 0x5846_5342;
    if ((major, minor) >= (6, 17) && magic == EXT4) || ((major, minor) >= (6, 15) && magic == XFS) {
        assert_eq!(
            taken,
            WritePath::DontCache,
            "Linux {release} on fs magic {magic:#x} takes RWF_DONTCACHE"
        );
    }
}

fn fs_magic(dir: &std::path::Path) -> libc::__fsword_t {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a zeroed statfs is a valid value of the plain C struct,
    // which statfs fills; `c` is a NUL-terminated path.
    let (rc, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st), st)
    };
    assert_eq!(rc, 0, "statfs {}", dir.display());
    st.f_type
}

/// A file-backed overflow region keeps at most its write-behind window of
/// what it holds in the page cache, and every slot still reads back
/// exactly (from the file, once dropped).
#[test]
fn a_file_backed_overflow_region_keeps_its_writes_out_of_the_cache() {
    use nodedb_governor::{OverflowRegion, overflow::WRITE_BEHIND_BYTES};
    let path = scratch("overflow");
    let region = OverflowRegion::file(&path, 96 * MIB).unwrap();
    let file = File::open(&path).unwrap();
    let data = pattern(64 * MIB as usize);
    // The path is the region's to detect (the writer's tests cover both
    // paths' bounds): whichever it took, no more than the window stays.
    let mut slots = Vec::new();
    for piece in data.chunks(MIB as usize - 100) {
        slots.push(region.write(piece).unwrap());
        let (resident, _) = resident_bytes(&file).unwrap();
        assert!(
            resident <= WRITE_BEHIND_BYTES + 2 * MIB,
            "{} MiB of the region's file cached after {} slots",
            resident / MIB,
            slots.len()
        );
    }
    let back: Vec<u8> = slots.iter().flat_map(|s| s.read()).collect();
    assert!(
        back == data,
        "a slot read back differs from what was written"
    );
    drop(slots);
    fs::remove_file(&path).unwrap();
}
