//! Names an administrator gives things (volumes, mirrors): they become file names, NBD export
//! names and metric labels, so they are kept to a safe alphabet.

/// Checks a volume or mirror name: 1 to 64 letters, digits, '.', '_' or '-', not starting
/// with '.' (no path separators, no hidden files).
pub fn validate(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?} must be 1 to 64 characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) || name.starts_with('.') {
        return Err(format!("{name:?} may hold only letters, digits, '.', '_' and '-' and must not start with '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_and_hidden_names_are_refused() {
        for bad in ["", "a/b", "..", ".hidden", "a b", &"x".repeat(65)] {
            assert!(super::validate(bad).is_err(), "{bad:?}");
        }
        for good in ["vol0", "db-1.data_2", &"x".repeat(64)] {
            super::validate(good).unwrap();
        }
    }
}
