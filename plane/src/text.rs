//! Untrusted text in messages.

/// `text` quoted for a message: escaped as `{:?}` escapes it, and cut
/// short, so hostile input neither floods nor garbles a terminal.
pub fn quote(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    let cut: String = text.chars().take(MAX_CHARS).collect();
    let mut quoted = format!("{cut:?}");
    if cut.len() < text.len() {
        quoted.push('…');
    }
    quoted
}
