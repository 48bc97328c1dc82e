//! The agent directory: who may connect and which public key each agent holds.
//!
//! CentOps serves it as JSON (`{"response":[{"id","name","authentication_certificate",…}]}`,
//! or a bare array of the same objects). Parsing is all-or-nothing: one bad entry refuses the
//! whole document, with an error naming the entry, so the last good directory stays in force.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::crypto::PublicKey;
use crate::protocol::AgentId;

/// Parses a directory document's exact bytes (as a server forwards them): UTF-8 JSON of
/// the CentOps shape or a bare array.
pub fn parse(bytes: &[u8]) -> Result<Directory, DirectoryError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DirectoryError::Json(format!("not UTF-8 text: {e}")))?;
    Directory::from_json(text)
}

/// One agent the relay knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    pub public_key: PublicKey,
}

/// Why a directory document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryError {
    /// Not JSON, or not the CentOps shape.
    Json(String),
    /// One entry is wrong; `index` counts from 0 in document order.
    Entry {
        index: usize,
        id: Option<String>,
        problem: String,
    },
}

impl fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json(e) => write!(
                f,
                "agent directory is not valid JSON of the form {{\"response\":[…]}} or […]: {e}"
            ),
            Self::Entry {
                index,
                id: Some(id),
                problem,
            } => {
                write!(f, "agent directory entry #{index} (id {id:?}): {problem}")
            }
            Self::Entry {
                index,
                id: None,
                problem,
            } => {
                write!(f, "agent directory entry #{index}: {problem}")
            }
        }
    }
}

impl std::error::Error for DirectoryError {}

#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    CentOps { response: Vec<serde_json::Value> },
    Bare(Vec<serde_json::Value>),
}

#[derive(Deserialize)]
struct RawEntry {
    id: String,
    #[serde(default)]
    name: Option<String>,
    authentication_certificate: String,
}

/// A validated set of agents, keyed by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    agents: BTreeMap<AgentId, Agent>,
}

/// What changed between two directories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<AgentId>,
    pub removed: Vec<AgentId>,
    /// Same id, different public key.
    pub rekeyed: Vec<AgentId>,
    /// Only the display name changed.
    pub renamed: Vec<AgentId>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.rekeyed.is_empty()
            && self.renamed.is_empty()
    }
}

impl Directory {
    /// Parses a CentOps response or a bare array.
    pub fn from_json(text: &str) -> Result<Self, DirectoryError> {
        let doc: Document =
            serde_json::from_str(text).map_err(|e| DirectoryError::Json(e.to_string()))?;
        let values = match doc {
            Document::CentOps { response } => response,
            Document::Bare(v) => v,
        };
        let mut agents = BTreeMap::new();
        for (index, value) in values.into_iter().enumerate() {
            let agent = parse_entry(index, value)?;
            if agents.contains_key(&agent.id) {
                return Err(DirectoryError::Entry {
                    index,
                    id: Some(agent.id.to_string()),
                    problem: "duplicate id (each agent may appear once)".into(),
                });
            }
            agents.insert(agent.id.clone(), agent);
        }
        Ok(Self { agents })
    }

    /// The agents of several sources in one directory; where two list an id, the later
    /// source wins (the agents file first, then CentOps).
    pub fn merge<'a>(sources: impl IntoIterator<Item = &'a Directory>) -> Self {
        Self::from_agents(sources.into_iter().flat_map(|d| d.iter().cloned()))
    }

    /// Builds a directory from already validated agents (later duplicates win).
    pub(crate) fn from_agents(agents: impl IntoIterator<Item = Agent>) -> Self {
        Self {
            agents: agents.into_iter().map(|a| (a.id.clone(), a)).collect(),
        }
    }

    pub fn get(&self, id: &AgentId) -> Option<&Agent> {
        self.agents.get(id)
    }

    pub fn contains(&self, id: &AgentId) -> bool {
        self.agents.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    /// What would change if `next` replaced `self`.
    pub fn changes_to(&self, next: &Directory) -> Changes {
        let mut c = Changes::default();
        for (id, new) in &next.agents {
            match self.agents.get(id) {
                None => c.added.push(id.clone()),
                Some(old) if old.public_key != new.public_key => c.rekeyed.push(id.clone()),
                Some(old) if old.name != new.name => c.renamed.push(id.clone()),
                Some(_) => {}
            }
        }
        c.removed = self
            .agents
            .keys()
            .filter(|id| !next.contains(id))
            .cloned()
            .collect();
        c
    }
}

fn parse_entry(index: usize, value: serde_json::Value) -> Result<Agent, DirectoryError> {
    let id_hint = value.get("id").and_then(|v| v.as_str()).map(str::to_owned);
    let fail = |problem: String| DirectoryError::Entry {
        index,
        id: id_hint.clone(),
        problem,
    };
    let raw: RawEntry = serde_json::from_value(value).map_err(|e| fail(e.to_string()))?;
    let id = AgentId::new(raw.id).map_err(|e| fail(e.to_string()))?;
    let public_key = PublicKey::from_pem(&raw.authentication_certificate)
        .map_err(|e| fail(format!("authentication_certificate: {e}")))?;
    let name = raw.name.unwrap_or_else(|| id.to_string());
    Ok(Agent {
        id,
        name,
        public_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn pem() -> String {
        SecretKey::generate().unwrap().public_key().to_pem()
    }

    fn entry(id: &str, pem: &str) -> serde_json::Value {
        serde_json::json!({"id": id, "name": format!("Agency {id}"),
            "authentication_certificate": pem,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z"})
    }

    #[test]
    fn parses_centops_shape_and_bare_array() {
        let (a, b) = (entry("police", &pem()), entry("tax", &pem()));
        let wrapped = serde_json::json!({"response": [a.clone(), b.clone()]}).to_string();
        let bare = serde_json::json!([a, b]).to_string();
        let d1 = Directory::from_json(&wrapped).unwrap();
        let d2 = Directory::from_json(&bare).unwrap();
        assert_eq!(d1, d2);
        assert_eq!(d1.len(), 2);
        let police = d1.get(&"police".parse().unwrap()).unwrap();
        assert_eq!(police.name, "Agency police");
    }

    #[test]
    fn errors_name_the_entry() {
        let k = pem();
        let dup = serde_json::json!([entry("a", &k), entry("a", &k)]).to_string();
        let err = Directory::from_json(&dup).unwrap_err().to_string();
        assert!(
            err.contains("#1") && err.contains("\"a\"") && err.contains("duplicate"),
            "{err}"
        );

        let bad_id = serde_json::json!([entry("ok", &k), entry("no spaces", &k)]).to_string();
        let err = Directory::from_json(&bad_id).unwrap_err().to_string();
        assert!(
            err.contains("#1") && err.contains("invalid agent id"),
            "{err}"
        );

        let bad_key = serde_json::json!([entry(
            "x",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"
        )])
        .to_string();
        let err = Directory::from_json(&bad_key).unwrap_err().to_string();
        assert!(
            err.contains("#0")
                && err.contains("\"x\"")
                && err.contains("authentication_certificate"),
            "{err}"
        );

        let missing = serde_json::json!([{"id": "y"}]).to_string();
        let err = Directory::from_json(&missing).unwrap_err().to_string();
        assert!(err.contains("authentication_certificate"), "{err}");

        assert!(matches!(
            Directory::from_json("{\"nope\":1}"),
            Err(DirectoryError::Json(_))
        ));
        assert!(matches!(
            Directory::from_json("[1,"),
            Err(DirectoryError::Json(_))
        ));
    }

    #[test]
    fn changes_cover_added_removed_rekeyed_renamed() {
        let (ka, kb) = (pem(), pem());
        let old = Directory::from_json(
            &serde_json::json!([entry("a", &ka), entry("b", &kb), entry("c", &kb)]).to_string(),
        )
        .unwrap();
        let mut c = entry("c", &kb);
        c["name"] = "Renamed".into();
        let new = Directory::from_json(
            &serde_json::json!([entry("a", &pem()), c, entry("d", &ka)]).to_string(),
        )
        .unwrap();
        let ch = old.changes_to(&new);
        let ids = |v: &[AgentId]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(&ch.added), ["d"]);
        assert_eq!(ids(&ch.removed), ["b"]);
        assert_eq!(ids(&ch.rekeyed), ["a"]);
        assert_eq!(ids(&ch.renamed), ["c"]);
        assert!(new.changes_to(&new).is_empty());
    }

    #[test]
    fn parse_takes_bytes_and_merge_lets_later_sources_win() {
        let (k1, k2) = (pem(), pem());
        let file = parse(
            serde_json::json!([entry("a", &k1), entry("b", &k1)])
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let centops = parse(serde_json::json!([entry("b", &k2)]).to_string().as_bytes()).unwrap();
        let merged = Directory::merge([&file, &centops]);
        assert_eq!(merged.len(), 2);
        let b = merged.get(&"b".parse().unwrap()).unwrap();
        assert_eq!(
            b.public_key,
            centops.get(&"b".parse().unwrap()).unwrap().public_key
        );
        assert!(matches!(parse(b"\xff[]"), Err(DirectoryError::Json(_))));
    }
}
