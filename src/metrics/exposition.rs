//! Prometheus text exposition (format 0.0.4): `# HELP`/`# TYPE` once per family, then its
//! samples, with labels escaped. A family's samples stay together however the caller
//! interleaves them (one mirror or replica after another), as the format requires.

use std::fmt::Write as _;

use crate::latency::{HistogramSnapshot, LATENCY_BUCKETS};

/// Builds an exposition: `# HELP`/`# TYPE` once per family, then its samples.
#[derive(Default)]
pub struct Exposition {
    /// In the order they were first written to.
    families: Vec<Family>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    text: String,
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
    /// The text of family `name` (declared with `# HELP`/`# TYPE` the first time).
    fn family(&mut self, name: &'static str, kind: &'static str, help: &str) -> &mut String {
        let index = match self.families.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                let mut text = String::new();
                let _ = writeln!(text, "# HELP {name} {help}");
                let _ = writeln!(text, "# TYPE {name} {kind}");
                self.families.push(Family { name, kind, text });
                self.families.len() - 1
            }
        };
        let family = &mut self.families[index];
        debug_assert_eq!(family.kind, kind, "{name} is one kind of metric");
        &mut family.text
    }

    pub fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.family(name, "gauge", help), "{name}{} {value}", label_text(labels));
    }

    /// `name` must end in `_total`.
    pub fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], value: f64) {
        debug_assert!(name.ends_with("_total"), "counter {name} ends in _total");
        let _ = writeln!(self.family(name, "counter", help), "{name}{} {value}", label_text(labels));
    }

    pub fn histogram(&mut self, name: &'static str, help: &str, labels: &[(&str, &str)], snapshot: &HistogramSnapshot) {
        let text = self.family(name, "histogram", help);
        for (index, count) in snapshot.cumulative.iter().enumerate() {
            let bound = LATENCY_BUCKETS.get(index).map_or("+Inf".to_string(), |b| b.to_string());
            let mut with_le = labels.to_vec();
            with_le.push(("le", &bound));
            let _ = writeln!(text, "{name}_bucket{} {count}", label_text(&with_le));
        }
        let _ = writeln!(text, "{name}_sum{} {}", label_text(labels), snapshot.sum_seconds);
        let _ = writeln!(text, "{name}_count{} {}", label_text(labels), snapshot.count());
    }

    pub fn finish(self) -> String {
        self.families.into_iter().map(|f| f.text).collect()
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

    #[test]
    fn a_family_stays_together_when_its_samples_are_interleaved() {
        let mut out = Exposition::default();
        for mirror in ["m1", "m2"] {
            out.gauge("a", "first", &[("mirror", mirror)], 1.0);
            out.counter("b_total", "second", &[("mirror", mirror)], 2.0);
        }
        assert_eq!(
            out.finish(),
            "# HELP a first\n# TYPE a gauge\na{mirror=\"m1\"} 1\na{mirror=\"m2\"} 1\n\
             # HELP b_total second\n# TYPE b_total counter\nb_total{mirror=\"m1\"} 2\nb_total{mirror=\"m2\"} 2\n"
        );
    }
}
