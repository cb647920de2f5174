//! Prometheus text exposition (format 0.0.4): `# HELP`/`# TYPE` once per family, then its
//! samples, with labels escaped.

use std::fmt::Write as _;

use crate::latency::{HistogramSnapshot, LATENCY_BUCKETS};

/// Builds an exposition: `# HELP`/`# TYPE` once per family, then its samples.
#[derive(Default)]
pub struct Exposition {
    text: String,
    declared: Vec<&'static str>,
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n").replace('"', "\\\"")
}

fn label_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels.iter().map(|(name, value)| format!("{name}=\"{}\"", escape(value))).collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    fn declare(&mut self, name: &'static str, kind: &str, help: &str) {
        if !self.declared.contains(&name) {
            self.declared.push(name);
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} {kind}");
        }
    }

    pub fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, "gauge", help);
        let _ = writeln!(self.text, "{name}{} {value}", label_text(labels));
    }

    /// `name` must end in `_total`.
    pub fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.declare(name, "counter", help);
        let _ = writeln!(self.text, "{name}{} {value}", label_text(labels));
    }

    pub fn histogram(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], snapshot: &HistogramSnapshot) {
        self.declare(name, "histogram", help);
        for (index, count) in snapshot.cumulative.iter().enumerate() {
            let bound = LATENCY_BUCKETS.get(index).map_or("+Inf".to_string(), |b| b.to_string());
            let mut with_le = labels.to_vec();
            with_le.push(("le", &bound));
            let _ = writeln!(self.text, "{name}_bucket{} {count}", label_text(&with_le));
        }
        let _ = writeln!(self.text, "{name}_sum{} {}", label_text(labels), snapshot.sum_seconds);
        let _ = writeln!(self.text, "{name}_count{} {}", label_text(labels), snapshot.count());
    }

    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let mut out = Exposition::default();
        out.gauge("x", "help", &[("name", "a\"b\\c\nd")], 1.0);
        assert!(out.finish().contains(r#"x{name="a\"b\\c\nd"} 1"#));
    }
}
