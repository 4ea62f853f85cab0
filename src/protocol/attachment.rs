//! Attachments: the files a prompt carries (`attachments` in the JSON
//! prompt), checked and decoded far enough to know their size; they reach
//! OpenCode as `file` parts whose `url` is a `data:` URL.

use base64::Engine as _;
use serde_json::Value;

use super::image::{dimensions, ImageFormat};
use super::prompt::PromptLimits;

/// One file sent with a prompt, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The name the caller gave (OpenCode shows it to the model).
    pub filename: String,
    /// `type/subtype`, lowercase: given, else guessed from the name
    /// ([`guess_mime`]).
    pub mime: String,
    /// The content as standard base64 (line breaks removed), checked to
    /// decode.
    pub base64: String,
    /// The decoded size in bytes (above zero).
    pub size: usize,
}

impl Attachment {
    /// `data:<mime>;base64,<content>`: the `url` of OpenCode's file part.
    pub fn data_url(&self) -> String {
        format!("data:{};base64,{}", self.mime, self.base64)
    }
}

/// The longest file name taken (bytes).
pub const MAX_FILENAME_BYTES: usize = 255;

/// Reads the `attachments` field of a JSON prompt: absent or `null` is none.
/// The reason of an `Err` names the attachment (by index and name) and the
/// limit or rule it broke; it becomes a `bad_request`.
pub fn parse_attachments(
    v: Option<Value>,
    limits: &PromptLimits,
) -> Result<Vec<Attachment>, String> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("`attachments` must be an array of objects".into()),
    };
    // Counted before any is read: each costs OpenCode work of its own.
    if items.len() > limits.max_attachments {
        return Err(format!(
            "the prompt carries {} attachments, above the limit of {} (max_attachments); send fewer (bundle small files into one)",
            items.len(),
            limits.max_attachments
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    let mut total = 0usize;
    for (i, item) in items.into_iter().enumerate() {
        let a = parse_one(i, item, limits)?;
        total += a.size;
        if total > limits.max_attachments_bytes {
            return Err(format!(
                "attachments add up to more than {} bytes (max_attachments_bytes)",
                limits.max_attachments_bytes
            ));
        }
        out.push(a);
    }
    Ok(out)
}

fn parse_one(i: usize, item: Value, limits: &PromptLimits) -> Result<Attachment, String> {
    let Value::Object(mut map) = item else {
        return Err(format!("`attachments[{i}]` must be an object"));
    };
    let mut string = |key: &str| -> Result<Option<String>, String> {
        match map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("`attachments[{i}].{key}` must be a string")),
        }
    };
    let filename = string("filename")?.unwrap_or_default();
    let content = string("content")?;
    let mime = string("mime")?;
    let filename = filename.trim().to_string();
    if filename.is_empty() {
        return Err(format!("`attachments[{i}].filename` is required"));
    }
    if filename.len() > MAX_FILENAME_BYTES || filename.chars().any(char::is_control) {
        return Err(format!(
            "`attachments[{i}].filename` must be at most {MAX_FILENAME_BYTES} bytes without control characters"
        ));
    }
    let Some(content) = content else {
        return Err(format!(
            "`attachments[{i}].content` ({filename:?}) is required (standard base64)"
        ));
    };
    let mime = match mime {
        Some(m) => {
            let m = m.trim().to_ascii_lowercase();
            if !is_mime(&m) {
                return Err(format!(
                    "`attachments[{i}].mime` {m:?} ({filename:?}) is not a media type like \"image/png\""
                ));
            }
            m
        }
        None => guess_mime(&filename).to_string(),
    };
    let base64: String = content
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    // Decoded size from the encoded length, checked before decoding: an
    // oversized attachment is refused without the allocation.
    let estimate = base64.len() / 4 * 3;
    if estimate > limits.max_attachment_bytes + 2 {
        return Err(too_big(i, &filename, limits));
    }
    let bytes = match base64::engine::general_purpose::STANDARD.decode(&base64) {
        Ok(bytes) => bytes,
        Err(e) => {
            return Err(format!(
                "`attachments[{i}].content` ({filename:?}) is not standard base64: {e}"
            ))
        }
    };
    let size = bytes.len();
    if size == 0 {
        return Err(format!(
            "`attachments[{i}]` ({filename:?}) is empty (0 bytes)"
        ));
    }
    if size > limits.max_attachment_bytes {
        return Err(too_big(i, &filename, limits));
    }
    check_image(&filename, &mime, &bytes, limits)
        .map_err(|e| format!("`attachments[{i}]` ({filename:?}) {e}"))?;
    Ok(Attachment {
        filename,
        mime,
        base64,
        size,
    })
}

/// An attachment that is an image by its media type or its name must be
/// one of the formats taken ([`ImageFormat`]), its content must be that
/// format (a file named `.png` is a PNG), and its header must declare at
/// most `max_image_pixels`: OpenCode decodes images whole, on the event
/// loop every tenant shares. The `Err` is the rest of a sentence that
/// starts with the attachment's name.
fn check_image(
    filename: &str,
    mime: &str,
    bytes: &[u8],
    limits: &PromptLimits,
) -> Result<(), String> {
    let by_name = guess_mime(filename);
    let named_image = by_name.starts_with("image/");
    if !mime.starts_with("image/") && !named_image {
        return Ok(());
    }
    let taken = || {
        ImageFormat::ALL
            .iter()
            .map(|f| f.mime())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if named_image && by_name != mime {
        return Err(format!("is named like {by_name} but declared {mime}"));
    }
    let Some(format) = ImageFormat::of_mime(mime) else {
        return Err(format!(
            "is {mime}, not an image format the bridge passes on ({})",
            taken()
        ));
    };
    match ImageFormat::sniff(bytes) {
        Some(f) if f == format => {}
        Some(f) => {
            return Err(format!(
                "is declared {mime} but its content is {}",
                f.mime()
            ))
        }
        None => {
            return Err(format!(
                "is declared {mime} but its content is not an image"
            ))
        }
    }
    let Some((w, h)) = dimensions(format, bytes) else {
        return Err(format!("has a {mime} header that cannot be read"));
    };
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_image_pixels {
        return Err(format!(
            "is {w}x{h} = {pixels} pixels, above the limit of {} pixels (max_image_pixels); scale it down",
            limits.max_image_pixels
        ));
    }
    Ok(())
}

fn too_big(i: usize, filename: &str, limits: &PromptLimits) -> String {
    format!(
        "`attachments[{i}]` ({filename:?}) is above the limit of {} bytes (max_attachment_bytes)",
        limits.max_attachment_bytes
    )
}

/// `type/subtype` of RFC 6838 restricted-name characters: nothing that could
/// end the media type inside a `data:` URL (`;`, `,`, spaces).
fn is_mime(m: &str) -> bool {
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    m.split_once('/').is_some_and(|(t, s)| name(t) && name(s))
}

/// The media type for a file name, by its extension (case-insensitive);
/// `application/octet-stream` when unknown. Source code and other plain
/// text formats are `text/plain`, which OpenCode passes to the model as
/// text.
pub fn guess_mime(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "bmp" => "image/bmp",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "md" | "markdown" => "text/markdown",
        "html" | "htm" => "text/html",
        "csv" => "text/csv",
        "xml" => "text/xml",
        "txt" | "log" | "yaml" | "yml" | "toml" | "ini" | "rs" | "py" | "js" | "ts" | "go"
        | "java" | "c" | "h" | "cpp" | "sh" | "sql" | "diff" | "patch" => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: PromptLimits = PromptLimits {
        max_prompt_bytes: 1 << 20,
        max_attachment_bytes: 10,
        max_attachments_bytes: 16,
        max_attachments: 4,
        max_image_pixels: 1000,
    };

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn parse(v: Value) -> Result<Vec<Attachment>, String> {
        parse_attachments(Some(v), &LIMITS)
    }

    #[test]
    fn absent_or_null_is_none() {
        assert_eq!(parse_attachments(None, &LIMITS), Ok(vec![]));
        assert_eq!(parse(Value::Null), Ok(vec![]));
        assert_eq!(parse(json!([])), Ok(vec![]));
    }

    #[test]
    fn mime_given_or_guessed_and_the_data_url() {
        let got = parse(json!([
            {"filename": "dot.TXT", "content": b64(b"hi")},
            {"filename": "notes", "content": b64(b"hi"), "mime": " Text/Plain "},
            {"filename": "main.rs", "content": b64(b"fn")},
            {"filename": "blob.bin", "content": b64(b"\0")},
        ]))
        .unwrap();
        let mimes: Vec<&str> = got.iter().map(|a| a.mime.as_str()).collect();
        assert_eq!(
            mimes,
            [
                "text/plain",
                "text/plain",
                "text/plain",
                "application/octet-stream"
            ]
        );
        assert_eq!(got[0].size, 2);
        assert_eq!(got[1].data_url(), "data:text/plain;base64,aGk=");
    }

    #[test]
    fn line_broken_base64_is_taken() {
        let got = parse(json!([{"filename": "a.txt", "content": "aGVs\nbG8=\r\n"}])).unwrap();
        assert_eq!(got[0].base64, "aGVsbG8=");
        assert_eq!(got[0].size, 5);
    }

    #[test]
    fn limits_per_attachment_and_per_prompt() {
        // Exactly at the per-attachment limit: taken.
        assert!(parse(json!([{"filename": "a", "content": b64(&[1; 10])}])).is_ok());
        let e = parse(json!([{"filename": "a", "content": b64(&[1; 11])}])).unwrap_err();
        assert!(
            e.contains("max_attachment_bytes") && e.contains("\"a\""),
            "{e}"
        );
        // Far above: refused from the encoded length.
        let e = parse(json!([{"filename": "a", "content": "A".repeat(4000)}])).unwrap_err();
        assert!(e.contains("max_attachment_bytes"), "{e}");
        // 8 + 8 = 16 is the prompt limit; one byte more is refused.
        let ok = json!([{"filename": "a", "content": b64(&[1; 8])},
                        {"filename": "b", "content": b64(&[1; 8])}]);
        assert_eq!(parse(ok).unwrap().len(), 2);
        let e = parse(json!([{"filename": "a", "content": b64(&[1; 8])},
                             {"filename": "b", "content": b64(&[1; 9])}]))
        .unwrap_err();
        assert!(e.contains("max_attachments_bytes"), "{e}");
    }

    #[test]
    fn every_bad_attachment_is_refused_with_a_reason() {
        let cases = [
            (json!({"a": 1}), "array"),
            (json!(["x"]), "must be an object"),
            (json!([{"content": b64(b"x")}]), "filename` is required"),
            (
                json!([{"filename": "  ", "content": b64(b"x")}]),
                "filename` is required",
            ),
            (
                json!([{"filename": "a\nb", "content": b64(b"x")}]),
                "control",
            ),
            (
                json!([{"filename": "a".repeat(256), "content": b64(b"x")}]),
                "255",
            ),
            (json!([{"filename": 3, "content": b64(b"x")}]), "string"),
            (json!([{"filename": "a"}]), "content` (\"a\") is required"),
            (json!([{"filename": "a", "content": ""}]), "empty (0 bytes)"),
            (
                json!([{"filename": "a", "content": "  \n"}]),
                "empty (0 bytes)",
            ),
            (
                json!([{"filename": "a", "content": "not base64!"}]),
                "not standard base64",
            ),
            (
                json!([{"filename": "a", "content": "aGk"}]),
                "not standard base64",
            ),
            (
                json!([{"filename": "a", "content": "aG-_"}]),
                "not standard base64",
            ),
            (
                json!([{"filename": "a", "content": b64(b"x"), "mime": "image/png;x=1,"}]),
                "media type",
            ),
            (
                json!([{"filename": "a", "content": b64(b"x"), "mime": "png"}]),
                "media type",
            ),
            (
                json!([{"filename": "a", "content": b64(b"x"), "mime": 1}]),
                "must be a string",
            ),
        ];
        for (v, needle) in cases {
            let e = parse(v.clone()).unwrap_err();
            assert!(e.contains(needle), "{v}: {e:?} does not mention {needle:?}");
        }
    }

    const IMAGES: PromptLimits = PromptLimits {
        max_attachment_bytes: 1 << 20,
        max_attachments_bytes: 1 << 20,
        ..LIMITS
    };

    fn image(v: Value) -> Result<Vec<Attachment>, String> {
        parse_attachments(Some(v), &IMAGES)
    }

    #[test]
    fn images_by_header_content_and_format() {
        use crate::protocol::image::tests::png_header;
        // 40 x 25 = 1000 pixels: at the limit, taken.
        let ok = image(json!([{"filename": "ok.png", "content": b64(&png_header(40, 25))}]));
        assert_eq!(ok.unwrap()[0].mime, "image/png");
        let cases = [
            // A bomb: refused from its header.
            (
                json!([{"filename": "bomb.png", "content": b64(&png_header(16000, 16000))}]),
                "(\"bomb.png\") is 16000x16000 = 256000000 pixels, above the limit of 1000 pixels (max_image_pixels)",
            ),
            (
                json!([{"filename": "fake.png", "content": b64(b"console.log(1)")}]),
                "(\"fake.png\") is declared image/png but its content is not an image",
            ),
            (
                json!([{"filename": "x.jpg", "content": b64(&png_header(1, 1))}]),
                "is declared image/jpeg but its content is image/png",
            ),
            (
                json!([{"filename": "x.png", "content": b64(&png_header(1, 1)), "mime": "image/jpeg"}]),
                "is named like image/png but declared image/jpeg",
            ),
            (
                json!([{"filename": "x.bmp", "content": b64(b"BM")}]),
                "is image/bmp, not an image format the bridge passes on (image/png, image/jpeg, image/gif, image/webp)",
            ),
            (
                json!([{"filename": "x", "content": b64(b"\x89PNG\r\n\x1a\n"), "mime": "image/png"}]),
                "has a image/png header that cannot be read",
            ),
        ];
        for (v, needle) in cases {
            let e = image(v.clone()).unwrap_err();
            assert!(e.contains(needle), "{v}: {e:?} does not say {needle:?}");
        }
        // Not an image by name nor type: not looked into.
        assert!(
            image(json!([{"filename": "a.txt", "content": b64(&png_header(9999, 9999))}])).is_ok()
        );
    }

    #[test]
    fn attachments_counted_before_they_are_read() {
        let five: Vec<Value> = (0..5)
            .map(|i| json!({"filename": format!("f{i}.txt"), "content": b64(b"x")}))
            .collect();
        assert_eq!(parse(json!(&five[..4])).unwrap().len(), 4);
        // The fifth is refused before any is decoded: even a broken one.
        let mut bad = five.clone();
        bad[0] = json!({"filename": "broken"});
        let e = parse(json!(bad)).unwrap_err();
        assert!(
            e.contains("carries 5 attachments, above the limit of 4 (max_attachments)"),
            "{e}"
        );
    }

    #[test]
    fn mime_guesses() {
        assert_eq!(guess_mime("photo.JPG"), "image/jpeg");
        assert_eq!(guess_mime("report.pdf"), "application/pdf");
        assert_eq!(guess_mime("README"), "application/octet-stream");
        assert_eq!(guess_mime("archive.tar.gz"), "application/octet-stream");
        assert!(is_mime("image/svg+xml"));
        assert!(!is_mime("image/"));
        assert!(!is_mime("/png"));
    }
}
