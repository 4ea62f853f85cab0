//! *(pure)* Fast byte scans: the first byte of a class, eight bytes at a
//! time. JSON string contents, for the event parser's fast path
//! (`opencode/events.rs`) and the reply writer (`protocol/reply.rs`); line
//! ends, for the SSE decoder (`opencode/sse.rs`).

/// A class of bytes a scanner looks for, tested one byte at a time and,
/// for eight at once, as a mask whose lowest set high bit marks the first
/// member (SWAR).
pub(crate) trait ByteClass {
    fn has(b: u8) -> bool;
    fn mask(x: u64) -> u64;
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// High bit of every zero byte of `x` (exact for the lowest one).
#[inline(always)]
fn zero(x: u64) -> u64 {
    x.wrapping_sub(LO) & !x & HI
}

/// What a JSON string cannot hold verbatim: `"`, `\`, a control character.
pub(crate) struct JsonSpecial;

impl ByteClass for JsonSpecial {
    #[inline(always)]
    fn has(b: u8) -> bool {
        (b < 0x20) | (b == b'"') | (b == b'\\')
    }
    #[inline(always)]
    fn mask(x: u64) -> u64 {
        let below_space = x.wrapping_sub(LO * 0x20) & !x & HI;
        below_space | zero(x ^ (LO * u64::from(b'"'))) | zero(x ^ (LO * u64::from(b'\\')))
    }
}

/// CR or LF: where an SSE line ends.
pub(crate) struct LineEnd;

impl ByteClass for LineEnd {
    #[inline(always)]
    fn has(b: u8) -> bool {
        (b == b'\n') | (b == b'\r')
    }
    #[inline(always)]
    fn mask(x: u64) -> u64 {
        zero(x ^ (LO * u64::from(b'\n'))) | zero(x ^ (LO * u64::from(b'\r')))
    }
}

/// Index of the first byte of class `C` from `i` on: 16 bytes at a time
/// through long runs (the compiler vectorises that loop), then eight at a
/// time, then the tail.
#[inline(always)]
pub(crate) fn find<C: ByteClass>(bytes: &[u8], mut i: usize) -> Option<usize> {
    while let Some(chunk) = bytes.get(i..i + 16) {
        let mut any = 0u8;
        for &b in chunk {
            any |= u8::from(C::has(b));
        }
        if any != 0 {
            break;
        }
        i += 16;
    }
    while let Some(w) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        let m = C::mask(u64::from_le_bytes(word));
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let p = bytes.get(i..)?.iter().position(|&b| C::has(b))?;
    Some(i + p)
}

/// Index of the first byte from `i` on that a JSON string cannot hold
/// verbatim (`"`, `\`, a control character).
pub(crate) fn next_special(bytes: &[u8], i: usize) -> Option<usize> {
    find::<JsonSpecial>(bytes, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_special_is_the_first_special_byte() {
        let special = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for filler in [b'a', 0x01, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa0, 0xff] {
            for len in 0..20 {
                for pos in 0..len {
                    for b in 0..=255u8 {
                        let mut v = vec![filler; len];
                        v[pos] = b;
                        let want = v.iter().position(|&c| special(c));
                        assert_eq!(next_special(&v, 0), want, "{v:?}");
                        let after = v[pos + 1..].iter().position(|&c| special(c));
                        let want = after.map(|p| p + pos + 1);
                        assert_eq!(next_special(&v, pos + 1), want, "{v:?} after {pos}");
                    }
                }
            }
        }
    }
}
