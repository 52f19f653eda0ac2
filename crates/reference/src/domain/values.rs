//! The reference application's validated values, built on the kernel's
//! text rules.

pub use scaleout::domain::values::{Id, Invalid};
use scaleout::domain::values::{Lines, text};

/// A file name: 1 to 255 characters, none refused by `text`, no line
/// breaks, no `/`, not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileName(String);

impl FileName {
    pub const MAX_LEN: usize = 255;

    pub fn parse(value: &str) -> Result<Self, Invalid> {
        let name = text(value, Self::MAX_LEN, Lines::Refused)?;
        if name.contains('/') {
            return Err(Invalid("must not contain '/'".into()));
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

/// A comment's author: 1 to 64 characters, none refused by `text`, no line breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author(String);

impl Author {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, Invalid> {
        text(value, Self::MAX_LEN, Lines::Refused).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A comment's text: 1 to 4,000 characters, none refused by `text`; line
/// breaks and tabs allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentText(String);

impl CommentText {
    pub const MAX_LEN: usize = 4000;

    pub fn parse(value: &str) -> Result<Self, Invalid> {
        text(value, Self::MAX_LEN, Lines::Allowed).map(Self)
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
    fn file_names_refuse_slashes_dots_control_and_length() {
        assert!(FileName::parse("Q3 report (final).pdf").is_ok());
        assert!(FileName::parse("été.txt").is_ok());
        for bad in [
            "",
            "   ",
            "a/b",
            ".",
            "..",
            "tab\there",
            "evil\u{202E}txt.exe",
        ] {
            assert!(FileName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(FileName::parse(&"é".repeat(255)).is_ok());
        assert!(FileName::parse(&"é".repeat(256)).is_err());
    }

    #[test]
    fn authors_and_comments_follow_the_text_rules() {
        assert!(CommentText::parse("two\nlines\twith a tab").is_ok());
        assert!(Author::parse("tab\there").is_err());
        assert!(Author::parse("nul\u{0}").is_err());
        assert!(CommentText::parse("ansi \u{1b}[31mred").is_err());
        assert!(CommentText::parse(&"x".repeat(4001)).is_err());
    }

    #[test]
    fn amounts_are_bounded() {
        assert!(Amount::parse(0).is_err());
        assert_eq!(Amount::parse(1).map(Amount::get), Ok(1));
        assert!(Amount::parse(Amount::MAX).is_ok());
        assert!(Amount::parse(Amount::MAX + 1).is_err());
    }
}
