//! Gson's string escaping, applied once per level of string nesting (SPEC §2.1).
//!
//! Gson with HTML-safe escaping writes `"` `\` as `\"` `\\`; `\t \b \n \r \f` by name; the other
//! control characters below U+0020 as `\u00xx`; `< > & = '` as `\u003c \u003e \u0026 \u003d
//! \u0027`; U+2028 and U+2029 as `\u2028` `\u2029`. Everything else, including non-ASCII, is
//! written raw. Documents in `dataContent` are JSON inside a JSON string, so their text is
//! escaped twice (and the JSON of a message quoted in an `errorMsg` gains one more level on
//! top of its own): [`escape_into`] takes
//! the number of levels and applies the rule that many times, character by character, without
//! an intermediate buffer.

use bytes::BufMut;

/// Class of every byte: 0 = written as is, otherwise the escape to use.
// Evaluated at compile time: an out-of-range index would fail the build, not a request.
#[allow(clippy::indexing_slicing)]
const CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table[b'<' as usize] = b'u';
    table[b'>' as usize] = b'u';
    table[b'&' as usize] = b'u';
    table[b'=' as usize] = b'u';
    table[b'\'' as usize] = b'u';
    // First byte of U+2028/U+2029 (E2 80 A8/A9): looked at more closely.
    table[0xe2] = LINE_SEPARATOR_LEAD;
    table
};

const LINE_SEPARATOR_LEAD: u8 = 0xff;
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `src` to `dst` with Gson's escaping applied `levels` times.
///
/// `levels == 0` copies `src` unchanged.
pub(crate) fn escape_into(dst: &mut impl BufMut, src: &[u8], levels: u8) {
    if levels == 0 {
        dst.put_slice(src);
        return;
    }
    let mut run_start = 0;
    let mut i = 0;
    while let Some(&byte) = src.get(i) {
        // A u8 always indexes a 256-entry table.
        #[allow(clippy::indexing_slicing)]
        let class = CLASS[usize::from(byte)];
        if class == 0 {
            i += 1;
            continue;
        }
        // An escape sequence is at most 6 bytes (`\u2028`).
        let mut seq = [0u8; 6];
        let len = match class {
            LINE_SEPARATOR_LEAD => match (src.get(i + 1), src.get(i + 2)) {
                (Some(0x80), Some(&last @ (0xa8 | 0xa9))) => {
                    seq = *b"\\u2028";
                    seq[5] = if last == 0xa8 { b'8' } else { b'9' };
                    6
                }
                _ => {
                    i += 1;
                    continue;
                }
            },
            // Only bytes below 0x80 have class `u`: both nibbles index the 16-entry table.
            #[allow(clippy::indexing_slicing)]
            b'u' => {
                seq = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xf)],
                ];
                6
            }
            short => {
                seq[0] = b'\\';
                seq[1] = short;
                2
            }
        };
        dst.put_slice(src.get(run_start..i).unwrap_or_default());
        escape_into(dst, seq.get(..len).unwrap_or_default(), levels - 1);
        // U+2028/2029 are three bytes; every other escaped character is one.
        i += if class == LINE_SEPARATOR_LEAD { 3 } else { 1 };
        run_start = i;
    }
    dst.put_slice(src.get(run_start..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str, levels: u8) -> String {
        let mut out = Vec::new();
        escape_into(&mut out, s.as_bytes(), levels);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn gson_html_safe_rules() {
        assert_eq!(esc("plain 中文 é", 1), "plain 中文 é");
        assert_eq!(esc(r#"a"b\c"#, 1), r#"a\"b\\c"#);
        assert_eq!(esc("<>&='", 1), r"\u003c\u003e\u0026\u003d\u0027");
        assert_eq!(
            esc("\t\u{8}\n\u{c}\r\u{1}\u{1f}\u{7f}", 1),
            "\\t\\b\\n\\f\\r\\u0001\\u001f\u{7f}"
        );
        assert_eq!(
            esc("\u{2028}x\u{2029}\u{2027}", 1),
            "\\u2028x\\u2029\u{2027}"
        );
    }

    #[test]
    fn nested_levels_compose() {
        assert_eq!(esc(r#"{"a":"<"}"#, 1), r#"{\"a\":\"\u003c\"}"#);
        assert_eq!(esc(r#"{"a":"<"}"#, 2), r#"{\\\"a\\\":\\\"\\u003c\\\"}"#);
        assert_eq!(esc("x", 0), "x");
        assert_eq!(esc("\"", 3), r#"\\\\\\\""#);
    }
}
