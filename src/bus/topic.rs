//! AMQP topic matching, for the in-process bus to route exactly as
//! RabbitMQ's topic exchange does: words split on `.`, `*` matches one word,
//! `#` zero or more.

/// Whether `routing_key` matches the binding `pattern`.
pub(crate) fn matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    match_words(&pattern, &key)
}

fn match_words(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| match_words(rest, &key[skip..])),
        Some((&word, rest)) => key.split_first().is_some_and(|(&first, tail)| {
            (word == "*" || word == first) && match_words(rest, tail)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn topic_patterns_match_as_rabbitmq_does() {
        let key = "file.scaleout.v1.FileRenamed";
        for pattern in [
            "#",
            "file.#",
            "file.scaleout.v1.FileRenamed",
            "*.scaleout.v1.*",
            "#.FileRenamed",
            "file.#.FileRenamed",
        ] {
            assert!(matches(pattern, key), "{pattern} should match {key}");
        }
        for pattern in [
            "counter.#",
            "file.*",
            "file",
            "*.FileRenamed",
            "file.scaleout.v1.FileRenamed.x",
        ] {
            assert!(!matches(pattern, key), "{pattern} should not match {key}");
        }
        assert!(matches("file.#", "file"));
        assert!(!matches("file.*", "file"));
    }
}
