//! The control channel's decoder against arbitrary bytes, fed in arbitrary
//! pieces, as both ends decode: it never panics, never yields a message
//! after an oversized frame, and every message it yields encodes back to a
//! frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodedb_governor::control::wire::{self, Decoder, ToAgent, ToLibrary, WireError};

fn check<T>(data: &[u8], cut: usize)
where
    T: for<'de> serde::Deserialize<'de> + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut d = Decoder::new();
    let mut broken = false;
    for part in [&data[..cut], &data[cut..]] {
        d.push(part);
        while let Some(m) = d.next_message::<T>() {
            assert!(!broken, "a message after an oversized frame");
            match m {
                Ok(msg) => {
                    let mut again = Decoder::new();
                    again.push(&wire::encode(&msg));
                    let back = again.next_message::<T>().expect("a whole frame");
                    assert_eq!(back.as_ref().ok(), Some(&msg), "round trip");
                }
                Err(WireError::Oversized { .. }) => broken = true,
                Err(e) => assert!(e.is_recoverable(), "{e}"),
            }
        }
    }
    let _ = d.finish();
}

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    check::<ToAgent>(data, cut);
    check::<ToLibrary>(data, cut);
});
