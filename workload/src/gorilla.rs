//! Gorilla compression for timeseries points (Pelkonen et al., "Gorilla: A
//! Fast, Scalable, In-Memory Time Series Database", VLDB 2015): timestamps
//! as delta-of-deltas in variable-width buckets, values as the XOR with the
//! previous value, stored as the meaningful bits only (reusing the previous
//! window of leading and trailing zeros when it fits).
//!
//! The delta-of-delta buckets hold two's complement values of 7, 9 and 12
//! bits (the paper's ranges shifted by one), and the escape holds 64 bits,
//! so any i64 timestamps round-trip. A segment is self-contained: the point
//! count, then the bit stream.

/// Appends bits to a byte vector, most significant bit first.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = the last byte is full or absent).
    used: u8,
}

impl BitWriter {
    fn push(&mut self, value: u64, bits: u8) {
        debug_assert!(bits <= 64);
        let mut left = bits;
        while left > 0 {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let room = 8 - self.used;
            let take = room.min(left);
            // The next `take` bits of `value` (from the top of the `left`
            // bits still to write).
            let chunk = ((value >> (left - take)) & ((1u64 << take) - 1)) as u8;
            let last = self.bytes.len() - 1;
            self.bytes[last] |= chunk << (room - take);
            self.used = (self.used + take) % 8;
            left -= take;
        }
    }

    fn bit(&mut self, b: bool) {
        self.push(u64::from(b), 1);
    }
}

/// Reads bits written by [`BitWriter`].
struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// A segment that ends early or holds an impossible code.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the segment ends {0} bits early")]
    Truncated(usize),
    #[error("the segment's header is missing")]
    NoHeader,
}

impl BitReader<'_> {
    fn read(&mut self, bits: u8) -> Result<u64, DecodeError> {
        let end = self.pos + bits as usize;
        if end > self.bytes.len() * 8 {
            return Err(DecodeError::Truncated(end - self.bytes.len() * 8));
        }
        let mut v = 0u64;
        for _ in 0..bits {
            let byte = self.bytes[self.pos / 8];
            let b = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | u64::from(b);
            self.pos += 1;
        }
        Ok(v)
    }

    fn bit(&mut self) -> Result<bool, DecodeError> {
        Ok(self.read(1)? == 1)
    }
}

fn sign_extend(v: u64, bits: u8) -> i64 {
    let shift = 64 - u32::from(bits);
    ((v << shift) as i64) >> shift
}

/// Compresses points as they come.
pub struct Encoder {
    w: BitWriter,
    count: u32,
    prev_ts: i64,
    prev_delta: i64,
    prev_value: u64,
    /// The previous value's window: leading zeros and meaningful bits.
    window: Option<(u8, u8)>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Self {
            w: BitWriter::default(),
            count: 0,
            prev_ts: 0,
            prev_delta: 0,
            prev_value: 0,
            window: None,
        }
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the segment takes so far.
    pub fn compressed_bytes(&self) -> usize {
        4 + self.w.bytes.len()
    }

    pub fn push(&mut self, ts: i64, value: f64) {
        let bits = value.to_bits();
        match self.count {
            0 => {
                self.w.push(ts as u64, 64);
                self.w.push(bits, 64);
            }
            1 => {
                let delta = ts.wrapping_sub(self.prev_ts);
                self.w.push(delta as u64, 64);
                self.prev_delta = delta;
                self.push_value(bits);
            }
            _ => {
                let delta = ts.wrapping_sub(self.prev_ts);
                let dod = delta.wrapping_sub(self.prev_delta);
                match dod {
                    0 => self.w.bit(false),
                    -64..=63 => {
                        self.w.push(0b10, 2);
                        self.w.push(dod as u64, 7);
                    }
                    -256..=255 => {
                        self.w.push(0b110, 3);
                        self.w.push(dod as u64, 9);
                    }
                    -2048..=2047 => {
                        self.w.push(0b1110, 4);
                        self.w.push(dod as u64, 12);
                    }
                    _ => {
                        self.w.push(0b1111, 4);
                        self.w.push(dod as u64, 64);
                    }
                }
                self.prev_delta = delta;
                self.push_value(bits);
            }
        }
        self.prev_ts = ts;
        self.prev_value = bits;
        self.count += 1;
    }

    fn push_value(&mut self, bits: u64) {
        let x = bits ^ self.prev_value;
        if x == 0 {
            self.w.bit(false);
            return;
        }
        self.w.bit(true);
        let leading = (x.leading_zeros() as u8).min(31);
        let trailing = x.trailing_zeros() as u8;
        if let Some((pl, pm)) = self.window
            && leading >= pl
            && trailing >= 64 - pl - pm
        {
            // Fits the previous window.
            self.w.bit(false);
            self.w.push(x >> (64 - pl - pm), pm);
            return;
        }
        let meaningful = 64 - leading - trailing;
        self.w.bit(true);
        self.w.push(u64::from(leading), 5);
        // 1..=64 stored as 0..=63.
        self.w.push(u64::from(meaningful - 1), 6);
        self.w.push(x >> trailing, meaningful);
        self.window = Some((leading, meaningful));
    }

    /// The segment: the count, then the bits.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.w.bytes.len());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.w.bytes);
        out
    }
}

/// Decompresses a segment.
pub fn decode(segment: &[u8]) -> Result<Vec<(i64, f64)>, DecodeError> {
    let (head, body) = segment
        .split_first_chunk::<4>()
        .ok_or(DecodeError::NoHeader)?;
    let count = u32::from_le_bytes(*head) as usize;
    let mut r = BitReader {
        bytes: body,
        pos: 0,
    };
    let mut out = Vec::with_capacity(count);
    let (mut ts, mut delta, mut value) = (0i64, 0i64, 0u64);
    let mut window = (0u8, 0u8);
    for i in 0..count {
        match i {
            0 => {
                ts = r.read(64)? as i64;
                value = r.read(64)?;
            }
            _ => {
                if i == 1 {
                    delta = r.read(64)? as i64;
                } else {
                    let dod = if !r.bit()? {
                        0
                    } else if !r.bit()? {
                        sign_extend(r.read(7)?, 7)
                    } else if !r.bit()? {
                        sign_extend(r.read(9)?, 9)
                    } else if !r.bit()? {
                        sign_extend(r.read(12)?, 12)
                    } else {
                        r.read(64)? as i64
                    };
                    delta = delta.wrapping_add(dod);
                }
                ts = ts.wrapping_add(delta);
                if r.bit()? {
                    if r.bit()? {
                        let leading = r.read(5)? as u8;
                        let meaningful = r.read(6)? as u8 + 1;
                        window = (leading, meaningful);
                    }
                    let (l, m) = window;
                    value ^= r.read(m)? << (64 - l - m);
                }
            }
        }
        out.push((ts, f64::from_bits(value)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(points: &[(i64, f64)]) -> Vec<u8> {
        let mut e = Encoder::new();
        for &(t, v) in points {
            e.push(t, v);
        }
        let seg = e.finish();
        let back = decode(&seg).unwrap();
        assert_eq!(back.len(), points.len());
        for (a, b) in points.iter().zip(&back) {
            assert_eq!(a.0, b.0);
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "value bits");
        }
        seg
    }

    /// A small deterministic generator (no test dependency needed).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn regular_series_compress_well_and_round_trip() {
        // One point a second, a slowly moving gauge.
        let points: Vec<(i64, f64)> = (0..10_000)
            .map(|i| (1_700_000_000_000 + i * 1000, 20.0 + ((i / 60) as f64) * 0.5))
            .collect();
        let seg = round_trip(&points);
        let per_point = seg.len() as f64 / points.len() as f64;
        assert!(per_point < 1.0, "{per_point} bytes per point (raw: 16)");
    }

    #[test]
    fn every_bucket_and_extreme_values_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = -5_000_000i64;
        let mut points = Vec::new();
        for i in 0..20_000 {
            // Deltas of-deltas in every bucket, including huge jumps and
            // going backwards.
            let jitter = match i % 6 {
                0 => 0,
                1 => (rng.next() % 120) as i64 - 60,
                2 => (rng.next() % 500) as i64 - 250,
                3 => (rng.next() % 4000) as i64 - 2000,
                4 => (rng.next() as i64) >> 8,
                _ => -1_000_000,
            };
            t = t.wrapping_add(1000 + jitter);
            let v = match i % 7 {
                0 => f64::from_bits(rng.next()), // any bits, NaNs included
                1 => f64::INFINITY,
                2 => -0.0,
                3 => f64::MIN_POSITIVE,
                _ => (rng.next() % 1000) as f64 / 8.0,
            };
            points.push((t, v));
        }
        points.push((i64::MAX, f64::MAX));
        points.push((i64::MIN, f64::MIN));
        round_trip(&points);
        round_trip(&[]);
        round_trip(&[(42, 1.5)]);
        round_trip(&[(42, 1.5), (41, 1.5)]);
    }

    #[test]
    fn truncated_segments_are_refused() {
        let mut e = Encoder::new();
        for i in 0..100 {
            e.push(i * 10, i as f64 * 1.25);
        }
        let seg = e.finish();
        assert_eq!(decode(&seg[..2]), Err(DecodeError::NoHeader));
        assert!(matches!(
            decode(&seg[..seg.len() - 4]),
            Err(DecodeError::Truncated(_))
        ));
    }
}
