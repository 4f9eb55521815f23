//! The bundled list of common passwords that new passwords may not be.

use std::{collections::HashSet, sync::OnceLock};

/// One password a line, lower-cased; `#` lines are comments (the source).
const LIST: &str = include_str!("common_passwords.txt");

fn entries() -> impl Iterator<Item = &'static str> {
    LIST.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

fn set() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| entries().collect())
}

/// `lowered` is the candidate password, already lower-cased.
pub fn is_common(lowered: &str) -> bool {
    set().contains(lowered)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_is_lower_case_and_has_no_blank_lines() {
        for line in super::LIST.lines().filter(|line| !line.starts_with('#')) {
            assert!(!line.is_empty());
            assert_eq!(line, line.to_lowercase());
        }
    }

    #[test]
    fn the_list_holds_at_least_3000_passwords() {
        assert!(super::set().len() >= 3000, "{}", super::set().len());
    }

    #[test]
    fn sampled_entries_are_refused_and_a_passphrase_is_not() {
        for common in [
            "password", "iloveyou", "sunshine", "football", "baseball", "superman", "1qaz2wsx",
            "trustno1",
        ] {
            assert!(super::is_common(common), "{common}");
        }
        assert!(!super::is_common("correct horse battery staple"));
    }
}
