//! *(pure)* W3C Trace Context: the `traceparent` header
//! (<https://www.w3.org/TR/trace-context/#traceparent-header>).
//!
//! A prompt may carry `traceparent: 00-<trace-id>-<parent-id>-<flags>`.
//! The bridge's turn becomes a child of that span: every reply carries the
//! same trace id with the turn's own span id, so a tracing backend links
//! the caller's span, the turn and whatever consumes the replies.

use std::fmt;

/// A valid `traceparent`, normalised to version `00`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    trace_id: String,
    /// 16 lowercase hex digits, not all zero.
    span_id: String,
    /// `01` = sampled.
    flags: u8,
}

impl TraceParent {
    /// Parses a header value; `None` for anything the specification says
    /// to ignore (bad length, uppercase or non-hex digits, version `ff`,
    /// all-zero ids). A future version is accepted if its first four fields
    /// read like version `00`.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim();
        if v.len() < 55 || !v.is_char_boundary(55) {
            return None;
        }
        let (head, rest) = v.split_at(55);
        let mut parts = head.split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || version.len() != 2
            || trace_id.len() != 32
            || span_id.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        if ![version, trace_id, span_id, flags]
            .iter()
            .all(|p| is_hex(p))
        {
            return None;
        }
        match version {
            "ff" => return None,
            "00" if !rest.is_empty() => return None,
            _ if !rest.is_empty() && !rest.starts_with('-') => return None,
            _ => {}
        }
        if is_zero(trace_id) || is_zero(span_id) {
            return None;
        }
        Some(TraceParent {
            trace_id: trace_id.to_string(),
            span_id: span_id.to_string(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// A span of the same trace, child of this one, with a fresh span id.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id.clone(),
            span_id: random_span_id(),
            flags: self.flags,
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    pub fn span_id(&self) -> &str {
        &self.span_id
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

fn random_span_id() -> String {
    loop {
        let n: u64 = rand::random();
        if n != 0 {
            return format!("{n:016x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_specification_example() {
        let t = TraceParent::parse(GOOD).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.to_string(), GOOD);
        assert_eq!(
            TraceParent::parse(&format!("  {GOOD} "))
                .unwrap()
                .to_string(),
            GOOD
        );
    }

    #[test]
    fn child_keeps_trace_and_flags_with_a_new_span() {
        let t = TraceParent::parse(GOOD).unwrap();
        let c = t.child();
        assert_eq!(c.trace_id(), t.trace_id());
        assert_ne!(c.span_id(), t.span_id());
        assert_eq!(c.span_id().len(), 16);
        assert!(c.sampled());
        assert_eq!(TraceParent::parse(&c.to_string()), Some(c));
    }

    #[test]
    fn refuses_what_the_specification_says_to_ignore() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "0-04bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_future_version_is_read_as_version_00() {
        let t = TraceParent::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-the-future-holds",
        )
        .unwrap();
        assert_eq!(
            t.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
        assert!(!t.sampled());
    }
}
