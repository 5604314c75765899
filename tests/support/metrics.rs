//! A strict-enough OpenMetrics text parser for assertions: every line must be a descriptor,
//! a sample of a declared family, or the final `# EOF`.

use std::collections::HashMap;

/// One sample: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub value: f64,
}

/// Parses an exposition, failing on anything malformed.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut families: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut saw_eof = false;
    for line in text.lines() {
        if saw_eof {
            return Err(format!("content after # EOF: {line:?}"));
        }
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            check_name(name).map_err(|e| format!("{e} in {line:?}"))?;
            match kind {
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                        "gaugehistogram",
                    ];
                    if !known.contains(&t) {
                        return Err(format!("unknown type in {line:?}"));
                    }
                    families.insert(name.to_string(), t.to_string());
                }
                "HELP" | "UNIT" => {}
                _ => return Err(format!("unknown descriptor {line:?}")),
            }
            continue;
        }
        let sample = parse_sample(line)?;
        let family = family_of(&sample.name, &families)
            .ok_or_else(|| format!("sample of undeclared family: {line:?}"))?;
        let kind = &families[family];
        if kind == "counter"
            && !sample.name.ends_with("_total")
            && !sample.name.ends_with("_created")
        {
            return Err(format!("counter sample without _total: {line:?}"));
        }
        samples.push(sample);
    }
    if !saw_eof {
        return Err("missing # EOF".into());
    }
    Ok(samples)
}

/// The value of the sample `name` with exactly these labels (others ignored if absent).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let samples = parse(text).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{text}"));
    samples
        .into_iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn family_of<'a>(name: &str, families: &'a HashMap<String, String>) -> Option<&'a String> {
    let suffixes = [
        "", "_total", "_created", "_bucket", "_count", "_sum", "_info",
    ];
    suffixes.iter().find_map(|s| {
        name.strip_suffix(s)
            .and_then(|base| families.get_key_value(base))
            .map(|(k, _)| k)
    })
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let (name_labels, value) = match line.find('}') {
        Some(end) => (&line[..=end], line[end + 1..].trim()),
        None => line
            .split_once(' ')
            .ok_or_else(|| format!("no value: {line:?}"))?,
    };
    let (name, labels) = match name_labels.split_once('{') {
        Some((n, rest)) => (
            n,
            parse_labels(rest.strip_suffix('}').ok_or("unclosed labels")?)?,
        ),
        None => (name_labels, HashMap::new()),
    };
    check_name(name)?;
    let value = value.split(' ').next().unwrap_or("");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("bad value {v:?} in {line:?}"))?,
    };
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

fn parse_labels(mut s: &str) -> Result<HashMap<String, String>, String> {
    let mut labels = HashMap::new();
    while !s.is_empty() {
        let (key, rest) = s
            .split_once("=\"")
            .ok_or_else(|| format!("bad label in {s:?}"))?;
        check_name(key)?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("dangling escape".into()),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.insert(key.to_string(), value);
        s = rest[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&rest[end + 1..]);
    }
    Ok(labels)
}
