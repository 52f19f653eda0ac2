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

/// Parses free text of `min..=max` characters with no control characters.
fn text(value: &str, max: usize) -> Result<String, Invalid> {
    let chars = value.chars().count();
    if value.trim().is_empty() {
        return Err(Invalid("must not be empty or blank".into()));
    }
    if chars > max {
        return Err(Invalid(format!(
            "must be at most {max} characters, got {chars}"
        )));
    }
    Ok(value.to_owned())
}

/// A file name: 1 to 255 characters, no `/`, no control characters, not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileName(String);

impl FileName {
    pub const MAX_LEN: usize = 255;

    pub fn parse(value: &str) -> Result<Self, Invalid> {
        let name = text(value, Self::MAX_LEN)?;
        if name.contains('/') {
            return Err(Invalid("must not contain '/'".into()));
        }
        if name.chars().any(char::is_control) {
            return Err(Invalid("must not contain control characters".into()));
        }
        if name == "." || name == ".." {
            return Err(Invalid(format!("must not be {name:?}")));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A comment's author: 1 to 64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author(String);

impl Author {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, Invalid> {
        let author = text(value, Self::MAX_LEN)?;
        if author.chars().any(char::is_control) {
            return Err(Invalid("must not contain control characters".into()));
        }
        Ok(Self(author))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A comment's text: 1 to 4,000 characters (line breaks allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentText(String);

impl CommentText {
    pub const MAX_LEN: usize = 4000;

    pub fn parse(value: &str) -> Result<Self, Invalid> {
        text(value, Self::MAX_LEN).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How much to add to a counter: 1 to 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(u64);

impl Amount {
    pub const MAX: u64 = 1_000_000;

    pub fn parse(value: u64) -> Result<Self, Invalid> {
        if (1..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(Invalid(format!(
                "must be between 1 and {}, got {value}",
                Self::MAX
            )))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
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
    fn file_names_refuse_slashes_dots_control_and_length() {
        assert!(FileName::parse("Q3 report (final).pdf").is_ok());
        assert!(FileName::parse("été.txt").is_ok());
        for bad in ["", "   ", "a/b", ".", "..", "tab\there"] {
            assert!(FileName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(FileName::parse(&"é".repeat(255)).is_ok());
        assert!(FileName::parse(&"é".repeat(256)).is_err());
    }

    #[test]
    fn amounts_are_bounded() {
        assert!(Amount::parse(0).is_err());
        assert_eq!(Amount::parse(1).map(Amount::get), Ok(1));
        assert!(Amount::parse(Amount::MAX).is_ok());
        assert!(Amount::parse(Amount::MAX + 1).is_err());
    }
}
