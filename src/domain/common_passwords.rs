//! The bundled list of common passwords that new passwords may not be.

/// One password a line, lower-cased, from public lists of the most used ones.
const LIST: &str = include_str!("common_passwords.txt");

/// `lowered` is the candidate password, already lower-cased.
pub fn is_common(lowered: &str) -> bool {
    LIST.lines().any(|line| line == lowered)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_is_lower_case_and_has_no_blank_lines() {
        for line in super::LIST.lines() {
            assert!(!line.is_empty());
            assert_eq!(line, line.to_lowercase());
        }
    }
}
