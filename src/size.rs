//! Byte sizes as people type them: `512`, `4K`, `64M`, `10G`, `2T` (powers of 1024).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 4096, 64K, 512M, 10G, 1T)")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let error = |reason| SizeError { input: input.to_string(), reason };
    let text = input.trim();
    let (digits, suffix) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    if digits.is_empty() {
        return Err(error("no number"));
    }
    let shift = match suffix.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(error("unknown suffix")),
    };
    let value: u64 = digits.parse().map_err(|_| error("number too large"))?;
    value.checked_mul(1u64 << shift).ok_or_else(|| error("number too large"))
}

/// Shortest exact rendering: 1048576 -> "1M", 1000 -> "1000".
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Rounded for people: 0B, 512B, 4.0K, 12.3M, 1.5G (powers of 1024).
pub fn human_size(bytes: u64) -> String {
    let mut value = bytes as f64;
    for suffix in ["B", "K", "M", "G", "T"] {
        if value < 1024.0 || suffix == "T" {
            return if suffix == "B" { format!("{bytes}B") } else { format!("{value:.1}{suffix}") };
        }
        value /= 1024.0;
    }
    unreachable!("the loop returns at T")
}

/// Serde for an optional size in configuration files: a number of bytes or a string such as
/// "50M"; written back in the short string form.
pub mod serde_optional_size {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Bytes(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => serializer.serialize_str(&super::format_size(*bytes)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
        match Written::deserialize(deserializer).map_err(|_| serde::de::Error::custom("expected a number of bytes or a size such as \"50M\""))? {
            Written::Bytes(bytes) => Ok(Some(bytes)),
            Written::Text(text) => super::parse_size(&text).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("3MB").unwrap(), 3 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert_eq!(format_size(1 << 20), "1M");
        assert_eq!(format_size(1000), "1000");
    }
}
