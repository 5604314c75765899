//! Claim rules: which OIDC tokens a pool accepts once their signature is good. A pool lists
//! rules per claim (`repository = "org/app"`, `ref = ["refs/heads/main", "refs/tags/v*"]`);
//! every rule must match (AND), any pattern of a rule may (OR). Patterns are exact text or
//! globs where `*` matches any run of characters, `/` included. A claim that is missing, or
//! not a string, number or boolean, matches nothing.
//!
//! A rule set must say something: at least one rule with a pattern other than `*`, so a pool
//! can never accept every token an issuer such as GitHub signs for anyone.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::jwt::claim_text;

/// Longest pattern accepted in configuration.
pub const MAX_PATTERN_LEN: usize = 512;

/// All rules of one trusted issuer on one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRules {
    rules: Vec<ClaimRule>,
}

/// One claim and the patterns its value may match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRule {
    pub claim: String,
    pub patterns: Vec<String>,
}

/// Why a rule set was refused in configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("no claim rules: a trusted issuer needs at least one rule that is not just \"*\"")]
    Empty,
    #[error("claim rule for {0:?} has no patterns")]
    NoPatterns(String),
    #[error("claim rule pattern for {0:?} is empty or longer than {MAX_PATTERN_LEN} bytes")]
    BadPattern(String),
}

/// Rules as written in configuration: a claim name to one pattern or a list of patterns.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawPatterns {
    One(String),
    Many(Vec<String>),
}

impl ClaimRules {
    /// Rules from their configuration form.
    pub fn from_raw(raw: &BTreeMap<String, RawPatterns>) -> Result<Self, RulesError> {
        let rules = raw
            .iter()
            .map(|(claim, patterns)| ClaimRule::new(claim, patterns.clone().into_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        let says_something = rules.iter().any(|r| r.patterns.iter().any(|p| p != "*"));
        if !says_something {
            return Err(RulesError::Empty);
        }
        Ok(Self { rules })
    }

    /// The first rule the claims do not satisfy, or `None` when all do.
    pub fn first_mismatch(&self, claims: &Map<String, Value>) -> Option<&str> {
        self.rules
            .iter()
            .find(|rule| !rule.matches(claims))
            .map(|rule| rule.claim.as_str())
    }

    pub fn rules(&self) -> &[ClaimRule] {
        &self.rules
    }
}

impl ClaimRule {
    pub fn new(claim: &str, patterns: Vec<String>) -> Result<Self, RulesError> {
        if patterns.is_empty() {
            return Err(RulesError::NoPatterns(claim.into()));
        }
        let bad = |p: &String| p.is_empty() || p.len() > MAX_PATTERN_LEN;
        if claim.is_empty() || patterns.iter().any(bad) {
            return Err(RulesError::BadPattern(claim.into()));
        }
        Ok(Self {
            claim: claim.into(),
            patterns,
        })
    }

    fn matches(&self, claims: &Map<String, Value>) -> bool {
        let Some(value) = claims.get(&self.claim).and_then(claim_text) else {
            return false;
        };
        self.patterns.iter().any(|p| glob_match(p, &value))
    }
}

impl RawPatterns {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(p) => vec![p],
            Self::Many(ps) => ps,
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (possibly
/// empty) and everything else matches itself. Linear in practice: the classic backtracking
/// over the last `*` only, never exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rules(toml_text: &str) -> Result<ClaimRules, RulesError> {
        let raw: BTreeMap<String, RawPatterns> = toml::from_str(toml_text).unwrap();
        ClaimRules::from_raw(&raw)
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn globs_match_runs_of_anything_and_nothing_else() {
        assert!(glob_match("refs/tags/v*", "refs/tags/v1.2.3"));
        assert!(glob_match("org/*", "org/app/x"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("org/*", "org2/app"));
        assert!(!glob_match("a*b", "a"));
        assert!(!glob_match("", "a"));
        let long = "a".repeat(10_000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(200)), &long));
    }

    #[test]
    fn every_rule_must_match_and_any_pattern_may() {
        let r = rules(
            r#"repository = "org/app"
               ref = ["refs/heads/main", "refs/tags/v*"]"#,
        )
        .unwrap();
        let ok = claims(json!({"repository": "org/app", "ref": "refs/tags/v2"}));
        assert_eq!(r.first_mismatch(&ok), None);
        let wrong_ref = claims(json!({"repository": "org/app", "ref": "refs/heads/dev"}));
        assert_eq!(r.first_mismatch(&wrong_ref), Some("ref"));
        let missing = claims(json!({"ref": "refs/heads/main"}));
        assert_eq!(r.first_mismatch(&missing), Some("repository"));
        let not_text = claims(json!({"repository": ["org/app"], "ref": "refs/heads/main"}));
        assert_eq!(r.first_mismatch(&not_text), Some("repository"));
    }

    #[test]
    fn rule_sets_that_accept_anyone_are_refused() {
        assert_eq!(rules("").unwrap_err(), RulesError::Empty);
        assert_eq!(rules(r#"sub = "*""#).unwrap_err(), RulesError::Empty);
        assert_eq!(
            rules("sub = []").unwrap_err(),
            RulesError::NoPatterns("sub".into())
        );
        assert_eq!(
            rules(r#"sub = """#).unwrap_err(),
            RulesError::BadPattern("sub".into())
        );
        assert!(
            rules(
                r#"sub = "*"
                       repository_owner = "org""#
            )
            .is_ok()
        );
    }
}
