//! A flood of control-socket clients: some that stay (half silent, never
//! saying hello; half welcomed, never reading what the agent sends), and
//! many that come and go from several threads (half with a hello). The
//! flood test drives it against an agent it starts; `flood-probe` drives
//! it against any running agent (`cargo xtask run`'s, say).

use std::{io::Write, os::unix::net::UnixStream, path::Path};

/// Opens `n` connections that stay open while the result lives: the odd
/// ones send `hello` (and then never read), the even ones nothing. Those
/// the kernel refuses (the listen queue full) are left out.
pub fn hold_idle(control: &Path, hello: &[u8], n: usize) -> Vec<UnixStream> {
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let Ok(mut s) = UnixStream::connect(control) else {
            continue;
        };
        if i % 2 == 1 {
            let _ = s.write_all(hello);
        }
        idle.push(s);
    }
    idle
}

/// Opens and closes `n` connections from `threads` threads as fast as
/// they go, half of them sending `hello` first; returns how many the
/// kernel refused (the listen queue full).
pub fn churn(control: &Path, hello: &[u8], n: usize, threads: usize) -> u32 {
    let threads = threads.max(1);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut refused = 0u32;
                    for i in 0..n / threads {
                        match UnixStream::connect(control) {
                            Ok(mut s) => {
                                if (i + t) % 2 == 0 {
                                    let _ = s.write_all(hello);
                                }
                            }
                            Err(_) => refused += 1,
                        }
                    }
                    refused
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    })
}
