//! The relay's policy (`dmr-server run --policy-file`): who may send what to whom, and
//! each sender's rate and message-size limits. The format is documented in docs/POLICY.md.
//!
//! A [`Policy`] is parsed and checked whole (a bad file is refused with an error naming the
//! place and the problem), then compiled into sets so a decision is a few hash lookups.
//! Decisions read only an envelope's clear header and its size, never its content, and are
//! pure functions of the file: every instance given the same file decides the same way.
//! The one piece of state, the per-sender token buckets, lives in [`bucket`].

pub mod bucket;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Deserialize;

use crate::protocol::{AgentId, Header, Kind};

/// Why a policy document was refused, in words that point at the place to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyError {}

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

/// What a rule (or the default) does with a message it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// The document as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    rules: Vec<RuleDoc>,
    default: Option<Action>,
    #[serde(default)]
    limits: Vec<LimitDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: Option<String>,
    #[serde(default = "allow")]
    action: Action,
    from: Vec<String>,
    to: Vec<String>,
    types: Option<Vec<String>>,
}

fn allow() -> Action {
    Action::Allow
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LimitDoc {
    from: Vec<String>,
    messages_per_second: Option<f64>,
    burst: Option<u32>,
    max_bytes: Option<u64>,
}

/// A set of agents a rule names: everyone, or these ids (groups already expanded).
#[derive(Debug)]
enum Agents {
    Any,
    Only(HashSet<AgentId>),
}

impl Agents {
    fn contains(&self, id: &AgentId) -> bool {
        match self {
            Self::Any => true,
            Self::Only(ids) => ids.contains(id),
        }
    }
}

#[derive(Debug)]
struct Rule {
    name: String,
    action: Action,
    from: Agents,
    to: Agents,
    /// `None`: any type.
    types: Option<HashSet<Kind>>,
}

/// A sender's rate: `per_second` on average, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// The limits that apply to one sender (from the first `limits` entry naming it).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub rate: Option<Rate>,
    pub max_bytes: Option<u64>,
}

#[derive(Debug)]
struct LimitRule {
    from: Agents,
    limits: Limits,
}

/// A parsed, checked and compiled policy.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    default: Action,
    limits: Vec<LimitRule>,
}

/// A message the rules do not allow; its Display names the deciding rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// The rule's name, or `None` when no rule matched and the default denied.
    pub rule: Option<String>,
    pub sender: AgentId,
    pub recipient: AgentId,
    pub kind: Kind,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = format!("{} → {} (type {})", self.sender, self.recipient, self.kind);
        match &self.rule {
            Some(rule) => write!(f, "policy rule {rule:?} denies {what}"),
            None => write!(f, "no policy rule allows {what} and the default is deny"),
        }
    }
}

impl Policy {
    /// Parses and checks a policy document.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let doc: Document =
            serde_json::from_str(text).map_err(|e| PolicyError(format!("not a policy: {e}")))?;
        let groups = compile_groups(&doc.groups)?;
        let rules = doc
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile_rule(i, r, &groups))
            .collect::<Result<_, _>>()?;
        let limits = doc
            .limits
            .iter()
            .enumerate()
            .map(|(i, l)| compile_limit(i, l, &groups))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            rules,
            default: doc.default.unwrap_or(Action::Deny),
            limits,
        })
    }

    /// Number of rules, for logs.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first matching rule decides; without one, the default does.
    pub fn decide(&self, h: &Header) -> Result<(), Denied> {
        let rule = self.rules.iter().find(|r| {
            r.from.contains(&h.sender)
                && r.to.contains(&h.recipient)
                && r.types.as_ref().is_none_or(|t| t.contains(&h.kind))
        });
        let (action, name) = match rule {
            Some(r) => (r.action, Some(r.name.clone())),
            None => (self.default, None),
        };
        match action {
            Action::Allow => Ok(()),
            Action::Deny => Err(Denied {
                rule: name,
                sender: h.sender.clone(),
                recipient: h.recipient.clone(),
                kind: h.kind.clone(),
            }),
        }
    }

    /// The limits of the first `limits` entry naming `sender` (none when no entry does).
    pub fn limits_for(&self, sender: &AgentId) -> Limits {
        self.limits
            .iter()
            .find(|l| l.from.contains(sender))
            .map_or_else(Limits::default, |l| l.limits)
    }
}

/// Checks group names and members; nested groups are refused to keep rules easy to read.
fn compile_groups(
    doc: &BTreeMap<String, Vec<String>>,
) -> Result<HashMap<String, Vec<AgentId>>, PolicyError> {
    let mut groups = HashMap::new();
    for (name, members) in doc {
        if AgentId::new(name.as_str()).is_err() {
            return err(format!(
                "groups: name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            ));
        }
        let ids = members
            .iter()
            .map(|m| {
                AgentId::new(m.as_str()).map_err(|e| {
                    PolicyError(format!(
                        "groups.{name}: {e} (groups hold agent ids, not \"*\" or other groups)"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        groups.insert(name.clone(), ids);
    }
    Ok(groups)
}

/// Resolves `"*"`, `"@group"` and agent ids into a set; `at` says where, for errors.
fn compile_agents(
    at: &str,
    list: &[String],
    groups: &HashMap<String, Vec<AgentId>>,
) -> Result<Agents, PolicyError> {
    if list.is_empty() {
        return err(format!("{at}: empty list (use [\"*\"] for every agent)"));
    }
    let mut ids = HashSet::new();
    for entry in list {
        if entry == "*" {
            return Ok(Agents::Any);
        }
        match entry.strip_prefix('@') {
            Some(g) => match groups.get(g) {
                Some(members) => ids.extend(members.iter().cloned()),
                None => {
                    return err(format!(
                        "{at}: unknown group {entry:?} (define it in \"groups\")"
                    ))
                }
            },
            None => {
                let id =
                    AgentId::new(entry.as_str()).map_err(|e| PolicyError(format!("{at}: {e}")))?;
                ids.insert(id);
            }
        }
    }
    Ok(Agents::Only(ids))
}

fn compile_rule(
    i: usize,
    r: &RuleDoc,
    groups: &HashMap<String, Vec<AgentId>>,
) -> Result<Rule, PolicyError> {
    let name = match &r.name {
        Some(n) if n.is_empty() || n.len() > 64 || n.chars().any(char::is_control) => {
            return err(format!(
                "rules[{i}].name: must be 1-64 characters without control characters"
            ))
        }
        Some(n) => n.clone(),
        None => format!("rules[{i}]"),
    };
    let at = |field: &str| format!("rules[{i}] ({name:?}).{field}");
    let types = match &r.types {
        None => None,
        Some(t) if t.iter().any(|k| k == "*") => None,
        Some(t) if t.is_empty() => {
            return err(format!(
                "{}: empty list (omit it or use [\"*\"] for every type)",
                at("types")
            ))
        }
        Some(t) => Some(
            t.iter()
                .map(|k| {
                    Kind::new(k.as_str()).map_err(|e| PolicyError(format!("{}: {e}", at("types"))))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(Rule {
        from: compile_agents(&at("from"), &r.from, groups)?,
        to: compile_agents(&at("to"), &r.to, groups)?,
        name,
        action: r.action,
        types,
    })
}

fn compile_limit(
    i: usize,
    l: &LimitDoc,
    groups: &HashMap<String, Vec<AgentId>>,
) -> Result<LimitRule, PolicyError> {
    let at = format!("limits[{i}]");
    let rate = match (l.messages_per_second, l.burst) {
        (None, None) => None,
        (None, Some(_)) => return err(format!("{at}: \"burst\" needs \"messagesPerSecond\"")),
        (Some(r), _) if !(r.is_finite() && r > 0.0) => {
            return err(format!(
                "{at}.messagesPerSecond: must be a number above 0, got {r}"
            ))
        }
        (Some(_), Some(0)) => return err(format!("{at}.burst: must be at least 1")),
        // Without a burst, a second's worth (at least one message) may come at once.
        (Some(r), b) => Some(Rate {
            per_second: r,
            burst: b.map_or(r.ceil().max(1.0), f64::from),
        }),
    };
    if l.max_bytes == Some(0) {
        return err(format!("{at}.maxBytes: must be at least 1"));
    }
    if rate.is_none() && l.max_bytes.is_none() {
        return err(format!(
            "{at}: give \"messagesPerSecond\" and/or \"maxBytes\""
        ));
    }
    Ok(LimitRule {
        from: compile_agents(&format!("{at}.from"), &l.from, groups)?,
        limits: Limits {
            rate,
            max_bytes: l.max_bytes,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageId;

    fn header(from: &str, to: &str, kind: &str) -> Header {
        Header {
            id: MessageId::random(),
            sender: AgentId::new(from).unwrap(),
            recipient: AgentId::new(to).unwrap(),
            created_at_ms: 0,
            kind: Kind::new(kind).unwrap(),
            seq: 0,
        }
    }

    const EXAMPLE: &str = r#"{
        "groups": {"police": ["police-tallinn", "police-tartu"], "ministries": ["tax", "social"]},
        "rules": [
            {"name": "no-police-to-health", "action": "deny", "from": ["@police"], "to": ["health"]},
            {"name": "police-ask", "from": ["@police"], "to": ["@ministries", "health"], "types": ["ChatMessage", "Question"]},
            {"name": "ministries-answer", "from": ["@ministries"], "to": ["*"]}
        ],
        "default": "deny",
        "limits": [
            {"from": ["police-tartu"], "maxBytes": 1000},
            {"from": ["@police"], "messagesPerSecond": 2, "burst": 5},
            {"from": ["*"], "messagesPerSecond": 0.5}
        ]
    }"#;

    #[test]
    fn first_matching_rule_decides() {
        let p = Policy::from_json(EXAMPLE).unwrap();
        assert!(p
            .decide(&header("police-tallinn", "tax", "Question"))
            .is_ok());
        assert!(p
            .decide(&header("social", "police-tartu", "Anything"))
            .is_ok());
        let d = p
            .decide(&header("police-tallinn", "health", "ChatMessage"))
            .unwrap_err();
        assert_eq!(d.rule.as_deref(), Some("no-police-to-health"));
        assert!(d.to_string().contains("\"no-police-to-health\""), "{d}");
        // A type the rule does not list falls through to the default.
        let d = p
            .decide(&header("police-tallinn", "tax", "Bulk"))
            .unwrap_err();
        assert_eq!(d.rule, None);
        assert!(d.to_string().contains("default is deny"), "{d}");
        assert!(p.decide(&header("stranger", "tax", "ChatMessage")).is_err());
    }

    #[test]
    fn limits_come_from_the_first_matching_entry() {
        let p = Policy::from_json(EXAMPLE).unwrap();
        let tartu = p.limits_for(&AgentId::new("police-tartu").unwrap());
        assert_eq!((tartu.rate, tartu.max_bytes), (None, Some(1000)));
        let tallinn = p.limits_for(&AgentId::new("police-tallinn").unwrap());
        assert_eq!(
            tallinn.rate,
            Some(Rate {
                per_second: 2.0,
                burst: 5.0
            })
        );
        let other = p.limits_for(&AgentId::new("tax").unwrap()).rate.unwrap();
        assert_eq!(
            other.burst, 1.0,
            "burst defaults to a second's worth, at least 1"
        );
    }

    #[test]
    fn no_rules_and_default_allow_allows_everything() {
        let p = Policy::from_json(r#"{"default": "allow"}"#).unwrap();
        assert!(p.decide(&header("a", "b", "X")).is_ok());
        let p = Policy::from_json("{}").unwrap();
        assert!(p.decide(&header("a", "b", "X")).is_err(), "default is deny");
        assert_eq!(p.limits_for(&AgentId::new("a").unwrap()), Limits::default());
    }

    #[test]
    fn bad_documents_name_the_place_and_the_problem() {
        for (doc, want) in [
            ("", "not a policy"),
            ("[]", "not a policy"),
            (r#"{"rulez": []}"#, "unknown field `rulez`"),
            (r#"{"default": "maybe"}"#, "unknown variant `maybe`"),
            (r#"{"rules": [{"from": ["a"]}]}"#, "missing field `to`"),
            (
                r#"{"rules": [{"from": ["a"], "to": ["@nope"]}]}"#,
                "rules[0] (\"rules[0]\").to: unknown group \"@nope\"",
            ),
            (
                r#"{"rules": [{"name": "x", "from": [], "to": ["a"]}]}"#,
                "rules[0] (\"x\").from: empty list",
            ),
            (
                r#"{"rules": [{"from": ["a b"], "to": ["a"]}]}"#,
                "invalid agent id",
            ),
            (
                r#"{"rules": [{"from": ["a"], "to": ["b"], "types": ["no/slash"]}]}"#,
                ".types: invalid message type",
            ),
            (
                r#"{"rules": [{"from": ["a"], "to": ["b"], "types": []}]}"#,
                ".types: empty list",
            ),
            (
                r#"{"rules": [{"name": "", "from": ["a"], "to": ["b"]}]}"#,
                "rules[0].name",
            ),
            (r#"{"groups": {"x y": ["a"]}}"#, "groups: name \"x y\""),
            (r#"{"groups": {"g": ["@h"]}}"#, "groups.g: invalid agent id"),
            (
                r#"{"limits": [{"from": ["*"], "messagesPerSecond": 0}]}"#,
                "limits[0].messagesPerSecond: must be a number above 0",
            ),
            (
                r#"{"limits": [{"from": ["*"], "messagesPerSecond": -1}]}"#,
                "above 0",
            ),
            (
                r#"{"limits": [{"from": ["*"], "burst": 3}]}"#,
                "\"burst\" needs \"messagesPerSecond\"",
            ),
            (
                r#"{"limits": [{"from": ["*"], "messagesPerSecond": 1, "burst": 0}]}"#,
                "limits[0].burst",
            ),
            (
                r#"{"limits": [{"from": ["*"], "maxBytes": 0}]}"#,
                "limits[0].maxBytes",
            ),
            (r#"{"limits": [{"from": ["*"]}]}"#, "limits[0]: give"),
            (
                r#"{"limits": [{"from": ["*"], "maxBytes": -5}]}"#,
                "not a policy",
            ),
        ] {
            let e = Policy::from_json(doc).expect_err(doc).to_string();
            assert!(e.contains(want), "{doc}: {e:?} should contain {want:?}");
        }
    }
}
