//! [pure] Image headers: which format the bytes are and how many pixels
//! they declare, read from the header alone (no decoding). OpenCode decodes
//! an image attachment synchronously on its one event loop, so a small
//! file that declares a huge canvas (a decompression bomb: a 16000x16000
//! PNG is 250 KB) stalls it for every tenant; the bridge reads the header
//! and refuses it first ([`super::attachment`]).

/// The image formats an attachment may have: those the models OpenCode
/// drives take as images (PNG, JPEG, GIF, WebP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Gif,
    Webp,
}

impl ImageFormat {
    /// Every format taken, for messages.
    pub const ALL: [ImageFormat; 4] = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Gif,
        ImageFormat::Webp,
    ];

    /// The media type (`image/png`).
    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// The format of a media type, if it is one taken.
    pub fn of_mime(mime: &str) -> Option<ImageFormat> {
        ImageFormat::ALL.into_iter().find(|f| f.mime() == mime)
    }

    /// The format the bytes start like (the magic numbers), if any.
    pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(b"\xff\xd8\xff") {
            Some(ImageFormat::Jpeg)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(ImageFormat::Gif)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else {
            None
        }
    }
}

/// Width and height declared by the header of `bytes` in `format`; `None`
/// when the header is cut short or malformed.
pub fn dimensions(format: ImageFormat, bytes: &[u8]) -> Option<(u32, u32)> {
    match format {
        ImageFormat::Png => png(bytes),
        ImageFormat::Jpeg => jpeg(bytes),
        ImageFormat::Gif => Some((u32::from(le16(bytes, 6)?), u32::from(le16(bytes, 8)?))),
        ImageFormat::Webp => webp(bytes),
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
}

/// The first chunk is IHDR: width and height, big-endian, at 16 and 20.
fn png(b: &[u8]) -> Option<(u32, u32)> {
    (b.get(12..16)? == b"IHDR").then_some(())?;
    Some((be32(b, 16)?, be32(b, 20)?))
}

/// Walks the segments to the first start-of-frame marker (SOF0..SOF15 but
/// DHT, JPG and DAC), whose body holds height then width.
fn jpeg(b: &[u8]) -> Option<(u32, u32)> {
    let mut at = 2;
    loop {
        // Fill bytes (0xFF runs) may precede a marker.
        while *b.get(at)? == 0xff && *b.get(at + 1)? == 0xff {
            at += 1;
        }
        if *b.get(at)? != 0xff {
            return None;
        }
        let marker = *b.get(at + 1)?;
        match marker {
            // Markers without a length.
            0x01 | 0xd0..=0xd7 => at += 2,
            0xc0..=0xcf if !matches!(marker, 0xc4 | 0xc8 | 0xcc) => {
                let h = be16(b, at + 5)?;
                let w = be16(b, at + 7)?;
                return Some((u32::from(w), u32::from(h)));
            }
            // Start of scan or end of image before any frame header.
            0xda | 0xd9 => return None,
            _ => at += 2 + usize::from(be16(b, at + 2)?),
        }
    }
}

/// `RIFF....WEBP` then a VP8 (lossy), VP8L (lossless) or VP8X (extended)
/// chunk, each with its own header layout.
fn webp(b: &[u8]) -> Option<(u32, u32)> {
    match b.get(12..16)? {
        b"VP8 " => {
            // Frame tag (3), start code (3), then 14-bit width and height.
            (b.get(23..26)? == b"\x9d\x01\x2a").then_some(())?;
            Some((
                u32::from(le16(b, 26)? & 0x3fff),
                u32::from(le16(b, 28)? & 0x3fff),
            ))
        }
        b"VP8L" => {
            (*b.get(20)? == 0x2f).then_some(())?;
            let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
            Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
        }
        b"VP8X" => Some((le24(b, 24)? + 1, le24(b, 27)? + 1)),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The first bytes of a PNG of `w` x `h` (signature and IHDR): all the
    /// header reader needs.
    pub fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend(w.to_be_bytes());
        b.extend(h.to_be_bytes());
        b.extend([8, 0, 0, 0, 0, 0, 0, 0, 0]);
        b
    }

    #[test]
    fn every_format_sniffed_and_measured() {
        let png = png_header(16000, 16000);
        assert_eq!(ImageFormat::sniff(&png), Some(ImageFormat::Png));
        assert_eq!(dimensions(ImageFormat::Png, &png), Some((16000, 16000)));

        let gif = b"GIF89a\x40\x01\xf0\x00\0\0\0".to_vec();
        assert_eq!(ImageFormat::sniff(&gif), Some(ImageFormat::Gif));
        assert_eq!(dimensions(ImageFormat::Gif, &gif), Some((320, 240)));

        // SOI, an APP0 segment of 16 bytes, then SOF0 (8 bits, h 600, w 800).
        let mut jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0".to_vec();
        jpeg.extend(b"\xff\xc0\x00\x11\x08\x02\x58\x03\x20\x03");
        assert_eq!(ImageFormat::sniff(&jpeg), Some(ImageFormat::Jpeg));
        assert_eq!(dimensions(ImageFormat::Jpeg, &jpeg), Some((800, 600)));
        // A DHT segment (0xC4) is not a frame header.
        let mut dht = b"\xff\xd8\xff\xc4\x00\x04\0\0".to_vec();
        dht.extend(b"\xff\xc2\x00\x11\x08\x00\x10\x00\x20\x03");
        assert_eq!(dimensions(ImageFormat::Jpeg, &dht), Some((32, 16)));

        let mut vp8x = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        vp8x.extend([0x3f, 0x1f, 0x00, 0x9f, 0x0f, 0x00]);
        assert_eq!(ImageFormat::sniff(&vp8x), Some(ImageFormat::Webp));
        assert_eq!(dimensions(ImageFormat::Webp, &vp8x), Some((8000, 4000)));
        let mut vp8l = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        // width-1 = 99, height-1 = 49 in 14-bit fields.
        vp8l.extend((99u32 | 49 << 14).to_le_bytes());
        assert_eq!(dimensions(ImageFormat::Webp, &vp8l), Some((100, 50)));
        let mut vp8 = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\x9d\x01\x2a".to_vec();
        vp8.extend([0x40, 0x01, 0xf0, 0x00]);
        assert_eq!(dimensions(ImageFormat::Webp, &vp8), Some((320, 240)));
    }

    #[test]
    fn not_images_and_cut_headers() {
        assert_eq!(ImageFormat::sniff(b"hello, world"), None);
        assert_eq!(ImageFormat::sniff(b""), None);
        let png = png_header(1, 1);
        for cut in 0..png.len() - 9 {
            assert_eq!(dimensions(ImageFormat::Png, &png[..cut]), None, "{cut}");
        }
        assert_eq!(dimensions(ImageFormat::Jpeg, b"\xff\xd8\xff\xe0\x00"), None);
        assert_eq!(dimensions(ImageFormat::Jpeg, b"\xff\xd8\xff\xd9"), None);
        assert_eq!(dimensions(ImageFormat::Webp, b"RIFF\0\0\0\0WEBPXXXX"), None);
        assert_eq!(ImageFormat::of_mime("image/png"), Some(ImageFormat::Png));
        assert_eq!(ImageFormat::of_mime("image/bmp"), None);
    }
}
