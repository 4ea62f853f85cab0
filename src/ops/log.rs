//! The daemon's log writer: standard error, each line passed through
//! [`crate::protocol::logsafe::escape_line`] so that nothing a caller sent
//! (a subject, a trace id, a header) can forge a line, recolour the
//! terminal or reorder what a reader sees.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

use crate::protocol::logsafe::{escape_line, LineStyle};

/// Standard error, each line escaped as `style` says.
#[derive(Debug, Clone, Copy)]
pub struct SafeStderr {
    pub style: LineStyle,
}

impl<'a> MakeWriter<'a> for SafeStderr {
    type Writer = SafeWriter;

    fn make_writer(&'a self) -> SafeWriter {
        SafeWriter { style: self.style }
    }
}

/// One event's writer: the formatter writes a whole line at once.
pub struct SafeWriter {
    style: LineStyle,
}

impl Write for SafeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        io::stderr().write_all(escape_line(&text, self.style).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}
