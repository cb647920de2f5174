//! Markers: named consistency points a user sets at the source ("the database is quiesced
//! now"). A marker is a journal record of kind `marker` whose payload this module defines; it
//! travels to the replicas with the other records, and an applier that applies it takes a
//! snapshot of the replica at exactly that LSN. Markers taken together on several volumes (a
//! consistency group) carry the group's name, the members and one id.
//!
//! Payload: UTF-8 JSON, `{"v":1,"name":..,"id":..,"created_us":..,"group":..,"members":[..]}`.
//! Journal format 1 reserved the kind with the name as the payload; a payload that is not
//! such a JSON object is read as a bare name (see docs/journal-format.md).

use serde::{Deserialize, Serialize};

/// Version of the payload's JSON form.
pub const PAYLOAD_VERSION: u32 = 1;

/// What a marker record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    #[serde(rename = "v")]
    pub version: u32,
    pub name: String,
    /// Shared by the markers of one group instant (one per member), unique otherwise.
    pub id: uuid::Uuid,
    /// Wall-clock time the marker was requested, microseconds since the Unix epoch.
    pub created_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The group's volumes, by name (empty for a marker on one volume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

impl Marker {
    /// A marker on one volume.
    pub fn single(name: &str) -> Marker {
        Marker {
            version: PAYLOAD_VERSION,
            name: name.to_string(),
            id: uuid::Uuid::new_v4(),
            created_us: crate::clock::now_micros(),
            group: None,
            members: Vec::new(),
        }
    }

    /// The marker of one member of a group instant: every member's carries the same id.
    pub fn of_group(name: &str, group: &str, members: Vec<String>, id: uuid::Uuid) -> Marker {
        Marker { version: PAYLOAD_VERSION, name: name.to_string(), id, created_us: crate::clock::now_micros(), group: Some(group.to_string()), members }
    }

    /// Checks what a user or a file may give: the names become directory names on the
    /// applier (snapshots) and must be safe there.
    pub fn validate(&self) -> Result<(), String> {
        crate::name::validate(&self.name).map_err(|e| format!("marker name {e}"))?;
        if let Some(group) = &self.group {
            crate::name::validate(group).map_err(|e| format!("group name {e}"))?;
        }
        for member in &self.members {
            crate::name::validate(member).map_err(|e| format!("group member {e}"))?;
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker serialises")
    }

    /// Reads a marker record's payload (from disk or the network: never panics). A payload
    /// that is not this JSON form is the bare name of format 1; `None` if that is not a safe
    /// name either.
    pub fn decode(payload: &[u8]) -> Option<Marker> {
        if let Ok(marker) = serde_json::from_slice::<Marker>(payload) {
            return marker.validate().is_ok().then_some(marker);
        }
        let name = std::str::from_utf8(payload).ok()?;
        crate::name::validate(name).ok()?;
        Some(Marker { version: 0, name: name.to_string(), id: uuid::Uuid::nil(), created_us: 0, group: None, members: Vec::new() })
    }
}

/// The name of a scheduled marker: `PREFIX-YYYYMMDDTHHMMSSZ` (UTC).
pub fn scheduled_name(prefix: &str, at: std::time::SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(at).to_string().replace(['-', ':'], "");
    format!("{prefix}-{stamp}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_round_trips_and_bad_ones_are_refused() {
        let marker = Marker::of_group("m1", "db", vec!["data".into(), "wal".into()], uuid::Uuid::new_v4());
        assert_eq!(Marker::decode(&marker.encode()), Some(marker));
        // Format 1's bare name still reads.
        assert_eq!(Marker::decode(b"nightly").map(|m| m.name), Some("nightly".to_string()));
        for bad in [&b"../etc"[..], b"", b"\xff\xfe", br#"{"v":1,"name":"a/b","id":"00000000-0000-0000-0000-000000000000","created_us":0}"#] {
            assert_eq!(Marker::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn scheduled_names_are_valid_names() {
        let name = scheduled_name("auto", std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000));
        assert_eq!(name, "auto-20270115T080000Z");
        crate::name::validate(&name).unwrap();
    }
}

/// When markers are taken by themselves: the `[markers]` table of `volume.toml` (run by
/// `run`) and a group's entry in the groups file (run by `marker schedule --group`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Interval between markers, e.g. "15m" (at least 10 s); absent: none scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// Scheduled markers are named `PREFIX-YYYYMMDDTHHMMSSZ` (default "auto").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Mounted filesystems frozen around each marker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<std::path::PathBuf>,
}

/// The shortest interval a schedule may have.
pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest interval a schedule (or a mirror's `verify_every`) may have: a century. Past
/// it a deadline `Instant::now() + interval` overflows (the scheduler thread panicked on
/// `every = "400000000000y"`) and the interval no longer fits in microseconds.
pub const MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

impl Schedule {
    pub fn is_default(&self) -> bool {
        self == &Schedule::default()
    }

    /// Checks the keys; `table` names the table in messages ("markers", "group.db").
    pub fn validate(&self, table: &str) -> Result<(), String> {
        if let Some(every) = &self.every {
            let interval = humantime::parse_duration(every).map_err(|e| format!("{table}.every: {every:?}: {e} (e.g. \"15m\", \"1h\")"))?;
            if interval < MIN_INTERVAL {
                return Err(format!("{table}.every: {every:?} is shorter than {} s", MIN_INTERVAL.as_secs()));
            }
            if interval > MAX_INTERVAL {
                return Err(format!("{table}.every: {every:?} is longer than a century"));
            }
        }
        crate::name::validate(self.prefix()).map_err(|e| format!("{table}.prefix: {e}"))?;
        for path in &self.freeze {
            if !path.is_absolute() {
                return Err(format!("{table}.freeze: {} is not an absolute path", path.display()));
            }
        }
        Ok(())
    }

    pub fn interval(&self) -> Option<std::time::Duration> {
        self.every.as_deref().and_then(|every| humantime::parse_duration(every).ok())
    }

    pub fn prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or("auto")
    }
}

/// The consistency groups file (default `/etc/ublk-mirror/groups.toml`): named groups of
/// volumes that markers mark at one instant. See docs/markers.md.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Groups {
    pub format_version: u32,
    #[serde(default)]
    pub group: std::collections::BTreeMap<String, Group>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The members' volume directories.
    pub volumes: Vec<std::path::PathBuf>,
    #[serde(flatten)]
    pub schedule: Schedule,
}

pub const DEFAULT_GROUPS_FILE: &str = "/etc/ublk-mirror/groups.toml";

impl Groups {
    /// Loads and checks the file; errors name it and the key at fault.
    pub fn load(path: &std::path::Path) -> Result<Groups, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let groups: Groups = toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end()))?;
        groups.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(groups)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != 1 {
            return Err(format!("format_version: {} is not supported (this build reads 1)", self.format_version));
        }
        for (name, group) in &self.group {
            crate::name::validate(name).map_err(|e| format!("group name {e}"))?;
            if group.volumes.len() < 2 {
                return Err(format!("group.{name}.volumes: a group needs at least two volumes"));
            }
            let mut seen = std::collections::HashSet::new();
            for volume in &group.volumes {
                if !seen.insert(volume) {
                    return Err(format!("group.{name}.volumes: {} is listed twice", volume.display()));
                }
            }
            group.schedule.validate(&format!("group.{name}"))?;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Group> {
        self.group.get(name)
    }
}
