//! *(pure)* Scanning JSON string contents: shared by the event parser's
//! fast path (`opencode/events.rs`) and the reply writer
//! (`protocol/reply.rs`).

/// Index of the first byte from `i` on that a JSON string cannot hold
/// verbatim (`"`, `\`, a control character). Eight bytes at a time (SWAR:
/// the lowest flagged byte of a word is exact).
pub(crate) fn next_special(bytes: &[u8], mut i: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(LO) & !x & HI;
    // Long runs: 16 bytes at a time (the compiler vectorises this loop).
    while let Some(chunk) = bytes.get(i..i + 16) {
        let mut any = 0u8;
        for &b in chunk {
            any |= u8::from((b < 0x20) | (b == b'"') | (b == b'\\'));
        }
        if any != 0 {
            break;
        }
        i += 16;
    }
    while let Some(w) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        let x = u64::from_le_bytes(word);
        let below_space = x.wrapping_sub(LO * 0x20) & !x & HI;
        let m = below_space | zero(x ^ (LO * u64::from(b'"'))) | zero(x ^ (LO * u64::from(b'\\')));
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let special = |b: u8| (b < 0x20) | (b == b'"') | (b == b'\\');
    let p = bytes.get(i..)?.iter().position(|&b| special(b))?;
    Some(i + p)
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
