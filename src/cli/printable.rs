//! integrity track (issue 10, low): what an app prints reaches the
//! operator's terminal through `logs` and `run` (without `-t`). Terminal
//! control sequences in it could retitle the window, clear the screen,
//! rewrite earlier lines or worse, so every control character but tab and
//! newline is shown in a visible form instead: C0 and DEL in caret
//! notation (`ESC` → `^[`), C1 (as UTF-8) as `\x9b`. Hand-written: the
//! rule is a byte table, and no crate keeps the printer's state across
//! chunks the way a stream needs.

/// A filter over a byte stream that may split a UTF-8 C1 character
/// (`C2 80`–`C2 9F`) across two chunks.
#[derive(Debug, Default)]
pub struct Printable {
    /// A `C2` that ended the previous chunk.
    pending_c2: bool,
}

impl Printable {
    pub fn new() -> Printable {
        Printable::default()
    }

    /// The printable form of the next chunk.
    pub fn filter(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        let mut bytes = input.iter().copied().peekable();
        if std::mem::take(&mut self.pending_c2) {
            match bytes.peek() {
                Some(&b) if (0x80..=0x9f).contains(&b) => {
                    bytes.next();
                    out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                }
                _ => out.push(0xc2),
            }
        }
        while let Some(b) = bytes.next() {
            match b {
                b'\t' | b'\n' => out.push(b),
                0x00..=0x1f => out.extend_from_slice(&[b'^', b + 0x40]),
                0x7f => out.extend_from_slice(b"^?"),
                0xc2 => match bytes.peek() {
                    Some(&n) if (0x80..=0x9f).contains(&n) => {
                        bytes.next();
                        out.extend_from_slice(format!("\\x{n:02x}").as_bytes());
                    }
                    None => self.pending_c2 = true,
                    _ => out.push(b),
                },
                _ => out.push(b),
            }
        }
        out
    }

    /// What is held back at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        if std::mem::take(&mut self.pending_c2) {
            vec![0xc2]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_shown_not_obeyed() {
        let mut p = Printable::new();
        assert_eq!(p.filter(b"\x1b]0;pwned\x07\x1b[2J ok\tx\n"), b"^[]0;pwned^G^[[2J ok\tx\n".to_vec());
        assert_eq!(p.filter(b"a\rb\x7f\x00"), b"a^Mb^?^@".to_vec());
        assert_eq!(p.filter("caf\u{e9} \u{9b}2J".as_bytes()), "caf\u{e9} \\x9b2J".as_bytes().to_vec());
    }

    #[test]
    fn a_c1_split_across_chunks_is_caught() {
        let mut p = Printable::new();
        let mut out = p.filter(b"x\xc2");
        out.extend(p.filter(b"\x9b2J"));
        out.extend(p.finish());
        assert_eq!(out, b"x\\x9b2J".to_vec());
        let mut out = p.filter(b"\xc2");
        out.extend(p.filter(b"\xa9"));
        assert_eq!(out, "\u{a9}".as_bytes().to_vec());
    }
}
