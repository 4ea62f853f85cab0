//! Bounded, incremental Server-Sent-Events decoder (WHATWG HTML "event stream
//! interpretation"). Pure: no I/O, no async. Feed it arbitrary byte chunks.
//!
//! Spec corners decided here:
//! - `SseEvent::id` is the *last event ID buffer* at dispatch time (it persists
//!   across events, as in the spec); `None` while that buffer is empty.
//! - `event:` with an empty value counts as "not given" (`None`), because the
//!   spec treats an empty type buffer as the default `message` type.
//! - `retry` is the value of a valid (ASCII digits only, fits `u64`) `retry:`
//!   field inside this event block; the latest valid value is also kept in
//!   [`SseDecoder::retry`] even when its block dispatched nothing.
//! - Size cap: decoded data + event type + the raw line being read must stay
//!   <= `max_event_bytes` (so memory is bounded even without any newline).
//! - Invalid UTF-8 in a `data`, `event` or `id` value poisons the event: it is
//!   reported once at its blank-line terminator and not dispatched.

use thiserror::Error;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SseError {
    #[error("SSE event exceeded {limit} bytes; skipped")]
    TooLarge { limit: usize },
    #[error("SSE event contained invalid UTF-8; skipped")]
    InvalidUtf8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    Event(SseEvent),
    Error(SseError),
}

#[derive(Debug)]
pub struct SseDecoder {
    max: usize,
    /// Bytes of the BOM matched so far; 3 = BOM check finished.
    bom: usize,
    /// The previous chunk ended in CR: swallow a leading LF.
    pending_cr: bool,
    /// Unterminated line carried over from earlier chunks.
    line: Vec<u8>,
    /// Discarding an oversized event up to its blank line.
    skipping: bool,
    /// While skipping: the current (discarded) line already has bytes.
    skip_partial: bool,
    invalid: bool,
    data: String,
    event: Option<String>,
    retry_field: Option<u64>,
    last_id: String,
    retry: Option<u64>,
}

impl SseDecoder {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max: max_event_bytes,
            bom: 0,
            pending_cr: false,
            line: Vec::new(),
            skipping: false,
            skip_partial: false,
            invalid: false,
            data: String::new(),
            event: None,
            retry_field: None,
            last_id: String::new(),
            retry: None,
        }
    }

    /// Last event ID buffer (what a reconnect would send as `Last-Event-ID`).
    pub fn last_event_id(&self) -> Option<&str> {
        Some(self.last_id.as_str()).filter(|s| !s.is_empty())
    }

    /// Latest valid `retry:` value seen on the stream.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    pub fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<SseItem>) {
        while self.bom < BOM.len() {
            let Some(&b) = chunk.first() else { return };
            if b == BOM[self.bom] {
                self.bom += 1;
                chunk = &chunk[1..];
            } else {
                // Not a BOM after all: replay the matched prefix as line bytes.
                let matched = self.bom;
                self.bom = BOM.len();
                self.partial(&BOM[..matched], out);
            }
        }
        if self.pending_cr && !chunk.is_empty() {
            self.pending_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        while let Some(pos) = find_eol(chunk) {
            let mut next = pos + 1;
            if chunk[pos] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
            self.end_line(&chunk[..pos], out);
            chunk = &chunk[next..];
        }
        self.partial(chunk, out);
    }

    /// End of stream: an unterminated event is discarded silently. The decoder
    /// is reset for a new stream (BOM check again); last event ID and retry
    /// are kept, as a reconnect needs them.
    pub fn finish(&mut self, _out: &mut Vec<SseItem>) {
        self.bom = 0;
        self.pending_cr = false;
        self.line.clear();
        self.skipping = false;
        self.skip_partial = false;
        self.reset_event();
    }

    fn reset_event(&mut self) {
        self.invalid = false;
        self.data.clear();
        self.event = None;
        self.retry_field = None;
    }

    fn accumulated(&self) -> usize {
        self.data.len() + self.event.as_ref().map_or(0, String::len)
    }

    fn overflow(&mut self, mid_line: bool, out: &mut Vec<SseItem>) {
        out.push(SseItem::Error(SseError::TooLarge { limit: self.max }));
        self.reset_event();
        self.line.clear();
        self.skipping = true;
        self.skip_partial = mid_line;
    }

    /// Bytes of a line whose terminator has not arrived yet.
    fn partial(&mut self, bytes: &[u8], out: &mut Vec<SseItem>) {
        if bytes.is_empty() {
            return;
        }
        if self.skipping {
            self.skip_partial = true;
        } else if self.accumulated() + self.line.len() + bytes.len() > self.max {
            self.overflow(true, out);
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, bytes: &[u8], out: &mut Vec<SseItem>) {
        if self.skipping {
            if bytes.is_empty() && !self.skip_partial {
                self.skipping = false;
            }
            self.skip_partial = false;
        } else if self.accumulated() + self.line.len() + bytes.len() > self.max {
            self.overflow(false, out);
        } else if self.line.is_empty() {
            self.process_line(bytes, out);
        } else {
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(bytes);
            self.process_line(&line, out);
            line.clear();
            self.line = line; // keep the allocation
        }
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseItem>) {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => match std::str::from_utf8(value) {
                Ok(s) if !self.invalid => {
                    self.data.push_str(s);
                    self.data.push('\n');
                }
                Ok(_) => {}
                Err(_) => self.invalid = true,
            },
            b"event" => match std::str::from_utf8(value) {
                Ok("") => self.event = None,
                Ok(s) => self.event = Some(s.to_owned()),
                Err(_) => self.invalid = true,
            },
            b"id" if !value.contains(&0) => match std::str::from_utf8(value) {
                Ok(s) => s.clone_into(&mut self.last_id),
                Err(_) => self.invalid = true,
            },
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                // All ASCII digits, so UTF-8; only overflow can fail.
                if let Ok(n) = std::str::from_utf8(value).unwrap_or("x").parse() {
                    self.retry_field = Some(n);
                    self.retry = Some(n);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseItem>) {
        if self.invalid {
            out.push(SseItem::Error(SseError::InvalidUtf8));
        } else if !self.data.is_empty() {
            // One exact-size allocation; the buffer is reused (minus the final '\n').
            let data = self.data[..self.data.len() - 1].to_owned();
            out.push(SseItem::Event(SseEvent {
                event: self.event.take(),
                data,
                id: self.last_event_id().map(str::to_owned),
                retry: self.retry_field,
            }));
        }
        self.reset_event();
    }
}

/// Index of the first CR or LF: finding line ends is most of the
/// decoder's work.
fn find_eol(bytes: &[u8]) -> Option<usize> {
    crate::jsonscan::find::<crate::jsonscan::LineEnd>(bytes, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CRLF: &[u8] = include_bytes!("../../tests/fixtures/sse/crlf.sse");
    const MIXED: &[u8] = include_bytes!("../../tests/fixtures/sse/mixed.sse");
    const CR_ONLY: &[u8] = include_bytes!("../../tests/fixtures/sse/cr_only.sse");

    fn ev(event: Option<&str>, data: &str, id: Option<&str>, retry: Option<u64>) -> SseItem {
        SseItem::Event(SseEvent {
            event: event.map(Into::into),
            data: data.into(),
            id: id.map(Into::into),
            retry,
        })
    }

    fn data(d: &str) -> SseItem {
        ev(None, d, None, None)
    }

    fn decode_chunks(max: usize, chunks: &[&[u8]]) -> Vec<SseItem> {
        let mut dec = SseDecoder::new(max);
        let mut out = Vec::new();
        for c in chunks {
            dec.feed(c, &mut out);
        }
        dec.finish(&mut out);
        out
    }

    fn decode(input: &[u8]) -> Vec<SseItem> {
        decode_chunks(1 << 20, &[input])
    }

    fn too_large(limit: usize) -> SseItem {
        SseItem::Error(SseError::TooLarge { limit })
    }

    #[test]
    fn find_eol_at_every_offset() {
        for len in 0..50 {
            let mut v = vec![b'x'; len];
            assert_eq!(find_eol(&v), None);
            for pos in 0..len {
                for eol in [b'\n', b'\r'] {
                    v[pos] = eol;
                    assert_eq!(find_eol(&v), Some(pos), "len {len} pos {pos}");
                    v[len - 1] = b'\n';
                    assert_eq!(find_eol(&v), Some(pos), "len {len} pos {pos}");
                    v.fill(b'x');
                }
            }
        }
    }

    #[test]
    fn line_endings() {
        let want = vec![data("a\nb"), data("c")];
        assert_eq!(decode(b"data: a\ndata: b\n\ndata: c\n\n"), want);
        assert_eq!(decode(b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"), want);
        assert_eq!(decode(b"data: a\rdata: b\r\rdata: c\r\r"), want);
        assert_eq!(decode(b"data: a\r\ndata: b\r\rdata: c\n\r\n"), want);
    }

    #[test]
    fn cr_lf_split_across_chunks_is_one_line_ending() {
        let got = decode_chunks(1024, &[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(got, vec![data("a\nb")]);
        // CR at chunk end followed by a non-LF byte: CR alone ends the line.
        let got = decode_chunks(1024, &[b"data: a\r", b"\r", b"data: b\r", b"", b"\r"]);
        assert_eq!(got, vec![data("a"), data("b")]);
    }

    #[test]
    fn bom_skipped_once_even_when_split() {
        let input = b"\xEF\xBB\xBFdata: x\n\n";
        assert_eq!(decode(input), vec![data("x")]);
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            assert_eq!(decode_chunks(64, &[a, b]), vec![data("x")], "split {split}");
        }
        assert_eq!(
            decode_chunks(64, &[b"\xEF", b"", b"\xBB", b"\xBFdata: x\n\n"]),
            vec![data("x")]
        );
        // Only one BOM is stripped; a second one is part of the field name.
        assert_eq!(decode(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), vec![]);
        // A partial BOM is kept as line bytes (here: an unknown field).
        assert_eq!(decode(b"\xEF\xBBdata: x\n\ndata: y\n\n"), vec![data("y")]);
    }

    #[test]
    fn fields() {
        // comments, field without colon, one optional space stripped, unknown fields
        let got = decode(b": hi\ndata\n\ndata:  two\nfoo: bar\n\ndata:x:y\n\n");
        assert_eq!(got, vec![data(""), data(" two"), data("x:y")]);
        // event type only when given; empty event value means "not given"
        let got = decode(b"event: add\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\n");
        assert_eq!(
            got,
            vec![ev(Some("add"), "1", None, None), data("2"), data("3")]
        );
        // empty data buffer: no dispatch (event/retry fields alone do nothing)
        assert_eq!(decode(b"event: x\n\nretry: 5\n\n\n\n"), vec![]);
        // retry: digits only, per block
        let got = decode(b"retry: 10\ndata: a\n\nretry: 1x\ndata: b\n\n");
        assert_eq!(got, vec![ev(None, "a", None, Some(10)), data("b")]);
    }

    #[test]
    fn id_persists_resets_and_ignores_nul() {
        let mut dec = SseDecoder::new(1024);
        let mut out = Vec::new();
        dec.feed(
            b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0\ndata: c\n\nid\ndata: d\n\n",
            &mut out,
        );
        let want = vec![
            ev(None, "a", Some("1"), None),
            ev(None, "b", Some("1"), None),
            ev(None, "c", Some("1"), None),
            data("d"),
        ];
        assert_eq!(out, want);
        assert_eq!(dec.last_event_id(), None);
        dec.feed(b"id: 9\nretry: 7\n\n", &mut out);
        assert_eq!((dec.last_event_id(), dec.retry()), (Some("9"), Some(7)));
    }

    #[test]
    fn incomplete_event_at_eof_discarded_silently() {
        assert_eq!(decode(b"data: a\n\ndata: b\n"), vec![data("a")]);
        assert_eq!(decode(b"data: a\n\ndata: b"), vec![data("a")]);
        let mut dec = SseDecoder::new(1024);
        let mut out = Vec::new();
        dec.feed(b"data: a\n", &mut out);
        dec.finish(&mut out);
        dec.feed(b"\xEF\xBB\xBFdata: b\n\n", &mut out); // decoder reusable
        assert_eq!(out, vec![data("b")]);
    }

    #[test]
    fn too_large_reports_once_and_recovers() {
        let big = format!("data: {}\ndata: {}\n\n", "x".repeat(30), "y".repeat(30));
        let input = format!("data: ok\n\n{big}data: after\n\n");
        assert_eq!(
            decode_chunks(50, &[input.as_bytes()]),
            vec![data("ok"), too_large(50), data("after")]
        );
        // An overlong line with no newline at all: bounded, reported once.
        let mut dec = SseDecoder::new(64);
        let mut out = Vec::new();
        for _ in 0..10_000 {
            dec.feed(&[b'z'; 100], &mut out);
        }
        assert!(dec.line.capacity() <= 64 && dec.data.capacity() <= 64);
        dec.feed(b"\rdata: still skipped\r\r\ndata: next\r\n\r\n", &mut out);
        assert_eq!(out, vec![too_large(64), data("next")]);
        // Exactly at the limit is fine; the cap counts the raw line.
        assert_eq!(decode_chunks(8, &[b"data: ab\n\n"]), vec![data("ab")]);
        assert_eq!(decode_chunks(7, &[b"data: ab\n\n"]), vec![too_large(7)]);
        // Comment lines also can't grow without bound.
        let input = format!(":{}\ndata: a\n\ndata: b\n\n", "c".repeat(100));
        assert_eq!(
            decode_chunks(32, &[input.as_bytes()]),
            vec![too_large(32), data("b")]
        );
    }

    #[test]
    fn invalid_utf8_skips_event_reports_once() {
        let got = decode(b"data: a\xFF\ndata: \xC3\n\ndata: ok\n\nevent: \xFF\ndata: x\n\n");
        let bad = SseItem::Error(SseError::InvalidUtf8);
        assert_eq!(got, vec![bad.clone(), data("ok"), bad]);
        // A multi-byte character split across chunks is fine.
        assert_eq!(
            decode_chunks(64, &[b"data: caf\xC3", b"\xA9\n\n"]),
            vec![data("café")]
        );
    }

    #[test]
    fn fixtures_decode_as_expected() {
        let msg = "{\"type\":\"message.part.updated\",\n \"x\": 1}";
        let want = vec![
            data(r#"{"type":"server.connected","properties":{}}"#),
            ev(Some("message"), msg, Some("1"), None),
            ev(None, "", Some("1"), Some(3000)),
        ];
        assert_eq!(decode(CRLF), want);
        let want = vec![
            data("a\nb"),
            ev(Some("ping"), "", None, None),
            data("x"),
            ev(None, " two spaces", Some("7"), None),
            ev(None, "no space", Some("7"), None),
            ev(None, "café €", Some("7"), None),
        ];
        assert_eq!(decode(MIXED), want);
        let want = vec![ev(Some("update"), "1\n2", None, None), data("3")];
        assert_eq!(decode(CR_ONLY), want);
    }

    const EXTRA: &[&[u8]] = &[
        b"data: a\r\n\r\ndata: b\r\rdata: c\n\n",
        b"\xEF\xBB\xBF: c\r\nevent: e\rdata: 1\r\ndata: 2\n\r\nid: 3\n\n",
        b"\xEF\xBBX\rdata: caf\xC3\xA9\xFF\r\rdata: ok\n\n",
        b"data: 0123456789abcdef\r\ndata: 0123456789\r\n\r\ndata: s\r\n\r\n",
    ];

    /// Feeding split at every offset (and every pair of offsets) gives the
    /// same items as feeding whole, for several size limits.
    #[test]
    fn every_split_matches_whole() {
        let inputs = [CRLF, MIXED, CR_ONLY]
            .into_iter()
            .chain(EXTRA.iter().copied());
        for input in inputs {
            for max in [1 << 20, 40, 16, 3] {
                let whole = decode_chunks(max, &[input]);
                for i in 0..=input.len() {
                    let (a, rest) = input.split_at(i);
                    assert_eq!(decode_chunks(max, &[a, rest]), whole, "max {max} split {i}");
                    for j in 0..=rest.len() {
                        let (b, c) = rest.split_at(j);
                        assert_eq!(
                            decode_chunks(max, &[a, b, c]),
                            whole,
                            "max {max} at {i},{j}"
                        );
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn random_chunking_matches_whole(
            parts in prop::collection::vec(prop::sample::select(vec![
                &b"data"[..], b"data:", b": ", b":", b"event: t", b"id: 1", b"id:\0",
                b"retry: 9", b"x", b"\xC3\xA9", b"\xFF", b"\r", b"\n", b"\r\n", b"\xEF\xBB\xBF",
            ]), 0..60),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            max in prop::sample::select(vec![4usize, 12, 30, 1 << 20]),
        ) {
            let input = parts.concat();
            let mut offsets: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            offsets.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for o in offsets {
                chunks.push(&input[prev..o]);
                prev = o;
            }
            chunks.push(&input[prev..]);
            prop_assert_eq!(decode_chunks(max, &chunks), decode_chunks(max, &[&input]));
        }
    }

    #[test]
    #[ignore = "throughput measurement; run with --release --ignored --nocapture"]
    fn throughput() {
        let one =
            b"data: {\"type\":\"message.part.updated\",\"properties\":{\"delta\":\"hi\"}}\n\n";
        let n = 2_000_000;
        let input: Vec<u8> = one.iter().copied().cycle().take(one.len() * n).collect();
        let mut dec = SseDecoder::new(1 << 20);
        let mut out = Vec::with_capacity(8192);
        let start = std::time::Instant::now();
        let mut count = 0;
        for chunk in input.chunks(16 * 1024) {
            dec.feed(chunk, &mut out);
            count += out.len();
            out.clear();
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(count, n);
        println!("{:.2} M events/s", n as f64 / secs / 1e6);
    }
}
