//! Terminal QR codes for handing a wg-quick client config to the WireGuard
//! mobile apps (`vpcgate peer add NAME --qr`), and the way back: reading such
//! a rendering into a module matrix and through a real QR decoder, which the
//! tests and the hidden `vpcgate qr-decode` command use to prove that what we
//! print scans.
//!
//! A rendering packs two module rows into each text row with Unicode half
//! blocks. Every line pins its colours (black background, bright white
//! foreground) and draws the *light* modules as ink, so dark modules are black
//! on both dark and light terminal themes. With the escapes stripped (a pager,
//! a log) it degrades to the inverted style of `qrencode -t UTF8`, which
//! still scans on a dark theme.

use qrcode::bits::Bits;
use qrcode::types::QrError as EncodeError;
use qrcode::{Color, EcLevel, QrCode, Version};

/// Level L (7% recovery): a screen is not scratched or folded, and L keeps a
/// ~400-byte config at version 13, 77 columns with the quiet zone, so it fits
/// an 80-column terminal; level M would need version 15 (85 columns).
const EC_LEVEL: EcLevel = EcLevel::L;

/// The margin of light modules the QR spec requires around the symbol.
const QUIET_ZONE: usize = 4;

/// Byte-mode capacity of the largest symbol (version 40) at [`EC_LEVEL`]; for
/// non-ASCII text the UTF-8 ECI header takes one byte of it.
const MAX_BYTES: usize = 2953;

/// The ECI designator that declares byte-mode data as UTF-8.
const ECI_UTF8: u32 = 26;

/// Columns and lines of the largest rendering: version 40 plus the quiet zone.
const MAX_COLUMNS: usize = 177 + 2 * QUIET_ZONE;
const MAX_LINES: usize = MAX_COLUMNS.div_ceil(2);

/// Pixels per module in the image handed to the decoder; the finder-pattern
/// detector wants patterns several pixels wide, as a camera would see them.
const PIXELS_PER_MODULE: usize = 4;

/// Black background, bright white foreground: both pinned, because the theme
/// picks the defaults; bright, because plain white is light grey in many
/// palettes.
const COLORS_ON: &str = "\x1b[40;97m";
const COLORS_OFF: &str = "\x1b[0m";

/// Glyph for each (top light, bottom light) pair of modules; the foreground
/// (white) draws light modules, the background (black) shows dark ones.
const GLYPHS: [(char, bool, bool); 4] = [
    ('█', true, true),
    ('▀', true, false),
    ('▄', false, true),
    (' ', false, false),
];

#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error(
        "the text is {len} bytes, more than a QR code can hold (at most {max}); transfer \
         the config as a file instead"
    )]
    TooLong { len: usize, max: usize },
    #[error("cannot encode the text as a QR code: {0}")]
    Encode(#[source] EncodeError),
    #[error("line {line} of the rendering: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("no QR code found in the rendering")]
    NotFound,
    #[error("found a QR code but could not decode it ({0}); the rendering is damaged")]
    Undecodable(#[source] rqrr::DeQRError),
}

/// Renders `text` as a QR code for a terminal: Unicode half blocks (two
/// modules per text row), a 4-module quiet zone (4½ at the bottom, where an
/// odd module count is padded with a light half row), error correction level
/// L. Each line sets black background and bright white foreground and resets
/// them before its newline; light modules are drawn as ink, so the code is
/// dark-on-light whatever the terminal theme. Text over 2953 bytes does not
/// fit in any QR code and is refused with [`QrError::TooLong`].
pub fn render(text: &str) -> Result<String, QrError> {
    let code = encode(text)?;
    let width = code.width();
    let side = width + 2 * QUIET_ZONE;
    let is_light = |x: usize, y: usize| {
        let inside = QUIET_ZONE..QUIET_ZONE + width;
        !inside.contains(&x)
            || !inside.contains(&y)
            || code[(x - QUIET_ZONE, y - QUIET_ZONE)] == Color::Light
    };
    let rows = side.div_ceil(2);
    let mut out = String::with_capacity(rows * (COLORS_ON.len() + 3 * side + COLORS_OFF.len() + 1));
    for y in (0..side).step_by(2) {
        out.push_str(COLORS_ON);
        for x in 0..side {
            out.push(glyph(is_light(x, y), is_light(x, y + 1)));
        }
        out.push_str(COLORS_OFF);
        out.push('\n');
    }
    Ok(out)
}

/// Parses the output of [`render`] (with or without its colour escapes, and
/// ignoring blank lines before and after it) back into a module matrix, and
/// decodes it with a real QR decoder that has to find the code by its finder
/// patterns, as a phone camera would.
pub fn decode_rendered(rendered: &str) -> Result<String, QrError> {
    let modules = Modules::parse(rendered)?;
    if modules.width == 0 {
        return Err(QrError::NotFound);
    }
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(
        modules.width * PIXELS_PER_MODULE,
        modules.height * PIXELS_PER_MODULE,
        |x, y| {
            if modules.is_light(x / PIXELS_PER_MODULE, y / PIXELS_PER_MODULE) {
                u8::MAX
            } else {
                0
            }
        },
    );
    let mut failure = None;
    for grid in image.detect_grids() {
        match grid.decode() {
            Ok((_, text)) => return Ok(text),
            Err(e) => failure = Some(e),
        }
    }
    Err(failure.map_or(QrError::NotFound, QrError::Undecodable))
}

/// Encodes `text` in byte mode in the smallest version that holds it.
///
/// Not the encoder's automatic mode: it picks Kanji mode for byte runs that
/// look like Shift JIS, which UTF-8 such as "✓✓✓" does, and scanners then
/// show Shift JIS. For the same reason non-ASCII text is announced as UTF-8
/// with an ECI header, since without one scanners guess, and zbar guesses
/// Shift JIS for such text. ASCII needs no header and goes out as `qrencode`
/// sends it. For a config the compact numeric and alphanumeric modes would not
/// save a version anyway.
fn encode(text: &str) -> Result<QrCode, QrError> {
    QrCode::with_bits(encode_bits(text)?, EC_LEVEL).map_err(QrError::Encode)
}

fn encode_bits(text: &str) -> Result<Bits, QrError> {
    let data = text.as_bytes();
    let max = if text.is_ascii() {
        MAX_BYTES
    } else {
        MAX_BYTES - 1
    };
    let too_long = || QrError::TooLong {
        len: data.len(),
        max,
    };
    if data.len() > max {
        return Err(too_long());
    }
    for version in 1..=40 {
        let mut bits = Bits::new(Version::Normal(version));
        let pushed = if text.is_ascii() {
            Ok(())
        } else {
            bits.push_eci_designator(ECI_UTF8)
        }
        .and_then(|()| bits.push_byte_data(data))
        .and_then(|()| bits.push_terminator(EC_LEVEL));
        match pushed {
            Ok(()) => return Ok(bits),
            Err(EncodeError::DataTooLong) => continue,
            Err(e) => return Err(QrError::Encode(e)),
        }
    }
    Err(too_long())
}

fn glyph(top_light: bool, bottom_light: bool) -> char {
    GLYPHS
        .iter()
        .find(|&&(_, top, bottom)| (top, bottom) == (top_light, bottom_light))
        .map_or(' ', |&(c, _, _)| c)
}

fn halves(c: char) -> Option<(bool, bool)> {
    GLYPHS
        .iter()
        .find(|&&(g, _, _)| g == c)
        .map(|&(_, top, bottom)| (top, bottom))
}

/// A rendering read back into modules, row-major, `true` for light.
struct Modules {
    width: usize,
    height: usize,
    light: Vec<bool>,
}

impl Modules {
    fn parse(rendered: &str) -> Result<Self, QrError> {
        let mut modules = Self {
            width: 0,
            height: 0,
            light: Vec::new(),
        };
        let mut blank_inside = None;
        for (index, line) in rendered.lines().enumerate() {
            let line_no = index + 1;
            let text = strip_escapes(line, line_no)?;
            if text.is_empty() {
                if modules.height > 0 {
                    blank_inside.get_or_insert(line_no);
                }
                continue;
            }
            if let Some(blank) = blank_inside {
                return Err(malformed(blank, "a blank line inside the rendering".into()));
            }
            modules.push_line(&text, line_no)?;
        }
        Ok(modules)
    }

    fn push_line(&mut self, text: &str, line_no: usize) -> Result<(), QrError> {
        let columns = text.chars().count();
        if self.height == 0 {
            if columns > MAX_COLUMNS {
                return Err(malformed(
                    line_no,
                    format!("{columns} columns, wider than the largest QR code ({MAX_COLUMNS})"),
                ));
            }
            self.width = columns;
        } else if columns != self.width {
            return Err(malformed(
                line_no,
                format!("{columns} columns, but the first line has {}", self.width),
            ));
        }
        if self.height / 2 == MAX_LINES {
            return Err(malformed(
                line_no,
                format!("more lines than the largest QR code needs ({MAX_LINES})"),
            ));
        }
        let mut bottom = Vec::with_capacity(columns);
        for (x, c) in text.chars().enumerate() {
            let (top_light, bottom_light) = halves(c).ok_or_else(|| {
                malformed(
                    line_no,
                    format!(
                        "unexpected {c:?} in column {}; a rendering holds only █, ▀, ▄ and \
                         spaces",
                        x + 1
                    ),
                )
            })?;
            self.light.push(top_light);
            bottom.push(bottom_light);
        }
        self.light.append(&mut bottom);
        self.height += 2;
        Ok(())
    }

    fn is_light(&self, x: usize, y: usize) -> bool {
        self.light.get(y * self.width + x).copied().unwrap_or(true)
    }
}

/// Removes ANSI control sequences (`ESC [` parameters, final byte), which is
/// all a rendering's colours are.
fn strip_escapes(line: &str, line_no: usize) -> Result<String, QrError> {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next() != Some('[') {
            return Err(malformed(line_no, "an escape that is not ESC [".into()));
        }
        loop {
            match chars.next() {
                Some('\x40'..='\x7e') => break,
                Some('\x20'..='\x3f') => {}
                _ => return Err(malformed(line_no, "an unterminated ESC [ sequence".into())),
            }
        }
    }
    Ok(out)
}

fn malformed(line: usize, reason: String) -> QrError {
    QrError::Malformed { line, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use qrcode::optimize::{Optimizer, Parser};
    use qrcode::types::Mode;

    const WG_CONFIG: &str = "\
# vpcgate peer alice-phone
[Interface]
PrivateKey = yByyL33njr1AX5H5SCnqwch4/m94fWZeyj37o4uJeU4=
Address = 10.77.0.12/32
DNS = 10.77.0.1, vpc.internal
MTU = 1380

[Peer]
# vpcgate gw1
PublicKey = sHO6ascWGP/MHw1PSLs5Dmp18EE5XWS1QmhemVSEnkE=
Endpoint = gw1.vpc.example.net:51820
AllowedIPs = 10.77.0.0/16, 172.31.0.0/16, 192.168.50.0/24
PersistentKeepalive = 25
";

    /// The visible characters of each line, escapes removed.
    fn visible(rendered: &str) -> Vec<Vec<char>> {
        rendered
            .lines()
            .map(|l| {
                strip_escapes(l, 0)
                    .expect("own rendering has valid escapes")
                    .chars()
                    .collect()
            })
            .collect()
    }

    fn round_trip(text: &str) {
        let rendered = render(text).expect("text fits a QR code");
        assert_eq!(decode_rendered(&rendered).expect("rendering decodes"), text);
    }

    #[test]
    fn wg_config_round_trips_and_fits_80_columns() {
        assert!(
            (350..=450).contains(&WG_CONFIG.len()),
            "{}",
            WG_CONFIG.len()
        );
        let rendered = render(WG_CONFIG).expect("text fits a QR code");
        assert_eq!(
            decode_rendered(&rendered).expect("rendering decodes"),
            WG_CONFIG
        );
        let rows = visible(&rendered);
        assert!(rows[0].len() <= 80, "{} columns", rows[0].len());
    }

    #[test]
    fn size_of_a_400_byte_config() {
        let mut config = WG_CONFIG.to_owned();
        while config.len() < 400 {
            config.push_str("# padding\n");
        }
        config.truncate(400);
        let rows = visible(&render(&config).expect("text fits a QR code"));
        // Version 13 is 69 modules: 77 columns, 39 text rows.
        assert_eq!((rows[0].len(), rows.len()), (77, 39));
    }

    #[test]
    fn rendering_has_pinned_colours_and_a_quiet_zone() {
        let rendered = render("quiet").expect("text fits a QR code");
        let rows = visible(&rendered);
        let side = rows[0].len();
        // "quiet" fits version 1: 21 modules.
        assert_eq!(side, 21 + 2 * QUIET_ZONE);
        assert_eq!(rows.len(), side.div_ceil(2));
        for line in rendered.lines() {
            assert!(line.starts_with(COLORS_ON) && line.ends_with(COLORS_OFF));
        }
        for row in &rows {
            assert_eq!(row.len(), side);
            assert!(row[..QUIET_ZONE].iter().all(|&c| c == '█'));
            assert!(row[side - QUIET_ZONE..].iter().all(|&c| c == '█'));
        }
        for row in rows[..QUIET_ZONE / 2].iter().chain(&rows[rows.len() - 2..]) {
            assert!(row.iter().all(|&c| c == '█'));
        }
    }

    #[test]
    fn other_strings_round_trip() {
        for text in [
            "",
            "x",
            "0123456789".repeat(40).as_str(),
            "HTTPS://GW1.EXAMPLE.NET:51820/ALLOWED 10.0.0.0/8",
            "lines\nwith\ttabs\r\nand \u{7f} controls",
            "東京 gateway — peer «β»",
        ] {
            round_trip(text);
        }
    }

    #[test]
    fn text_goes_out_as_one_byte_segment_with_utf8_declared_when_needed() {
        // The decoder here skips ECI headers and hands Kanji back as raw
        // bytes, so a round trip cannot tell; read the segment headers.
        let bytes = |text| encode_bits(text).expect("text fits a QR code").into_bytes();

        // Mode 0100 (byte), then an 8-bit count (versions 1 to 9): 4.
        let ascii = bytes("peer");
        assert_eq!((ascii[0], ascii[1] >> 4), (0x40, 4));

        // Witness that the automatic mode would send this as Kanji.
        let text = "peer ✓✓✓✓✓✓";
        let segments = Optimizer::new(Parser::new(text.as_bytes()), Version::Normal(1));
        assert!(segments.into_iter().any(|s| s.mode == Mode::Kanji));
        // Mode 0111 (ECI), designator 26 (UTF-8), mode 0100 (byte), count 23.
        let utf8 = bytes(text);
        assert_eq!(utf8[..3], [0x71, 0xa4, 23]);
        round_trip(text);
    }

    #[test]
    fn largest_text_round_trips_and_one_more_byte_is_refused() {
        let largest: String = (0..MAX_BYTES)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        round_trip(&largest);
        let rows = visible(&render(&largest).expect("text fits a QR code"));
        assert_eq!(rows[0].len(), 177 + 2 * QUIET_ZONE);

        let too_long = format!("{largest}a");
        let refused = render(&too_long);
        let expected = (MAX_BYTES + 1, MAX_BYTES);
        assert!(
            matches!(refused, Err(QrError::TooLong { len, max }) if (len, max) == expected),
            "{refused:?}"
        );
        // Non-ASCII text gives one byte to the UTF-8 header.
        let largest_non_ascii = "é".repeat(MAX_BYTES / 2);
        assert!(render(&largest_non_ascii).is_ok());
        let too_long = format!("{largest_non_ascii}a");
        let refused = render(&too_long);
        let expected = (MAX_BYTES, MAX_BYTES - 1);
        assert!(
            matches!(refused, Err(QrError::TooLong { len, max }) if (len, max) == expected),
            "{refused:?}"
        );
    }

    #[test]
    fn far_too_long_text_is_refused_with_advice() {
        let err = render(&"PrivateKey = x\n".repeat(2000)).expect_err("30000 bytes cannot fit");
        assert!(
            matches!(err, QrError::TooLong { len: 30000, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("as a file"), "{err}");
    }

    /// Inverts the glyphs in text rows `rows` and columns `cols`.
    fn flip(rendered: &str, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) -> String {
        visible(rendered)
            .into_iter()
            .enumerate()
            .map(|(r, row)| {
                let mut line: String = row
                    .into_iter()
                    .enumerate()
                    .map(|(c, ch)| {
                        if rows.contains(&r) && cols.contains(&c) {
                            let (top, bottom) = halves(ch).expect("own rendering has only glyphs");
                            glyph(!top, !bottom)
                        } else {
                            ch
                        }
                    })
                    .collect();
                line.push('\n');
                line
            })
            .collect()
    }

    #[test]
    fn corrupted_data_region_does_not_decode_to_the_original() {
        let rendered = render(WG_CONFIG).expect("text fits a QR code");
        // 16 × 16 modules in the middle of a 69-module symbol: more than
        // level L can correct.
        let damaged = flip(&rendered, 15..23, 30..46);
        match decode_rendered(&damaged) {
            Ok(text) => assert_ne!(text, WG_CONFIG),
            Err(QrError::Undecodable(_) | QrError::NotFound) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }

    #[test]
    fn corrupted_finder_pattern_is_not_found() {
        let rendered = render(WG_CONFIG).expect("text fits a QR code");
        // The top-left finder pattern: modules 4..11 in both directions.
        let damaged = flip(&rendered, 2..6, 4..11);
        assert!(matches!(decode_rendered(&damaged), Err(QrError::NotFound)));
    }

    #[test]
    fn rendering_without_colours_still_decodes() {
        let rendered = render(WG_CONFIG).expect("text fits a QR code");
        let plain: String = visible(&rendered)
            .into_iter()
            .map(|row| row.into_iter().chain(['\n']).collect::<String>())
            .collect();
        assert!(!plain.contains('\x1b'));
        assert_eq!(
            decode_rendered(&plain).expect("rendering decodes"),
            WG_CONFIG
        );
        let framed = format!("\n\n{rendered}\n\n");
        assert_eq!(
            decode_rendered(&framed).expect("rendering decodes"),
            WG_CONFIG
        );
    }

    #[test]
    fn malformed_renderings_are_errors() {
        let rendered = render("x").expect("text fits a QR code");
        let foreign = rendered.replacen('▀', "#", 1);
        assert!(matches!(
            decode_rendered(&foreign),
            Err(QrError::Malformed { reason, .. }) if reason.contains("'#'")
        ));
        let mut lines: Vec<String> = rendered.lines().map(str::to_owned).collect();
        lines[1].push('█');
        let ragged = lines.join("\n");
        assert!(matches!(
            decode_rendered(&ragged),
            Err(QrError::Malformed { line: 2, .. })
        ));
        let bad_escape = rendered.replacen("\x1b[", "\x1b]", 1);
        assert!(matches!(
            decode_rendered(&bad_escape),
            Err(QrError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            decode_rendered(&"█".repeat(MAX_COLUMNS + 1)),
            Err(QrError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            decode_rendered(&"█\n".repeat(MAX_LINES + 1)),
            Err(QrError::Malformed { line, .. }) if line == MAX_LINES + 1
        ));
        let gap = rendered.replacen('\n', "\n\n", 2);
        assert!(matches!(
            decode_rendered(&gap),
            Err(QrError::Malformed { line: 2, .. })
        ));
        assert!(matches!(decode_rendered(""), Err(QrError::NotFound)));
        assert!(matches!(decode_rendered("\n\n"), Err(QrError::NotFound)));
        assert!(matches!(
            decode_rendered(&"█".repeat(40)),
            Err(QrError::NotFound)
        ));
    }

    proptest! {
        // Each case runs the whole detector on a few hundred thousand pixels.
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn any_short_text_round_trips(text in "\\PC{0,120}") {
            let rendered = render(&text).expect("text fits a QR code");
            prop_assert_eq!(decode_rendered(&rendered).expect("rendering decodes"), text);
        }

        #[test]
        fn any_damage_to_a_rendering_decodes_without_panicking(
            cells in prop::collection::vec(any::<(Index, Index)>(), 1..200),
        ) {
            let mut rows = visible(&render(WG_CONFIG).expect("text fits a QR code"));
            let (height, width) = (rows.len(), rows[0].len());
            for (r, c) in cells {
                let (r, c) = (r.index(height), c.index(width));
                let (top, bottom) = halves(rows[r][c]).expect("own rendering has only glyphs");
                rows[r][c] = glyph(!top, !bottom);
            }
            let damaged: Vec<String> = rows.into_iter().map(String::from_iter).collect();
            let _ = decode_rendered(&damaged.join("\n"));
        }

        #[test]
        fn any_glyph_soup_decodes_without_panicking(
            rows in prop::collection::vec("[█▀▄ ]{60}", 0..40),
        ) {
            let _ = decode_rendered(&rows.join("\n"));
        }
    }
}
