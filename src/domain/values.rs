//! Validated input values: parse once at the edge, then trust the type.

use std::fmt;

/// Why an input value was refused; the adapter names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// An id chosen by a client: 1 to 64 of `A-Z a-z 0-9 - _ .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(String);

impl Id {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, Invalid> {
        if value.is_empty() {
            return Err(Invalid("must not be empty".into()));
        }
        if value.len() > Self::MAX_LEN {
            return Err(Invalid(format!(
                "must be at most {} characters, got {}",
                Self::MAX_LEN,
                value.len()
            )));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(Invalid(format!(
                "may only hold A-Z, a-z, 0-9, '-', '_' and '.', found {bad:?}"
            )));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether line breaks and tabs are part of the text (a comment's), or
/// not (a name's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    Allowed,
    Refused,
}

/// Parses free text of 1 to `max` characters, none of them one that
/// renders as something other than what is stored:
/// - control characters (C0, DEL, C1: NUL, ANSI escapes), except line
///   breaks and tabs where `lines` allows them;
/// - bidirectional embeddings, overrides and isolates (U+202A–U+202E,
///   U+2066–U+2069), which reorder the text after them on screen;
/// - zero-width and direction marks (U+200B–U+200F, U+2060, U+FEFF), which
///   make two names that look alike differ.
pub fn text(value: &str, max: usize, lines: Lines) -> Result<String, Invalid> {
    let chars = value.chars().count();
    if value.trim().is_empty() {
        return Err(Invalid("must not be empty or blank".into()));
    }
    if chars > max {
        return Err(Invalid(format!(
            "must be at most {max} characters, got {chars}"
        )));
    }
    let line_break = |c: char| matches!(c, '\n' | '\r' | '\t');
    if let Some(bad) = value.chars().find(|&c| {
        (c.is_control() && !(lines == Lines::Allowed && line_break(c)))
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2060}' | '\u{FEFF}')
    }) {
        return Err(Invalid(format!(
            "must not contain U+{:04X} (control, bidirectional or invisible characters are refused)",
            u32::from(bad)
        )));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_only() {
        assert!(Id::parse("report-2026_v1.2").is_ok());
        assert!(Id::parse("").is_err());
        assert!(Id::parse("a/b").is_err());
        assert!(Id::parse("naïve").is_err());
        assert!(Id::parse(&"x".repeat(64)).is_ok());
        assert!(Id::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn text_refuses_what_renders_otherwise_than_it_is_stored() {
        let refused = [
            "nul\u{0}",
            "ansi \u{1b}[31mred",
            "del\u{7f}",
            "c1\u{85}",
            "evil\u{202E}txt.exe",
            "isolate\u{2066}x",
            "zero\u{200B}width",
            "mark\u{200F}",
            "\u{FEFF}bom",
        ];
        for bad in refused {
            for lines in [Lines::Allowed, Lines::Refused] {
                assert!(text(bad, 100, lines).is_err(), "{bad:?} with {lines:?}");
            }
        }
        let refusal = text("evil\u{202E}txt.exe", 100, Lines::Refused).unwrap_err();
        assert!(refusal.0.contains("U+202E"), "{refusal}");
        assert!(text("two\nlines\twith a tab", 100, Lines::Allowed).is_ok());
        assert!(text("two\nlines", 100, Lines::Refused).is_err());
        assert!(text("emoji 👍 and العربية", 100, Lines::Refused).is_ok());
        assert!(text("   ", 100, Lines::Refused).is_err());
        assert!(text(&"é".repeat(101), 100, Lines::Refused).is_err());
    }
}
