//! Fleets: one script run by many accounts. Each account alone may look like anything; what
//! gives a fleet away is that its accounts share timing no two humans share.
//!
//! Three pure steps, each owned by one stage of the stream (`stream::fleet` wires them):
//! 1. **Fingerprints**, per user: at some presses (anchors, chosen by the content itself so
//!    every account of a fleet picks the same script positions), the hash of the last
//!    `flights` flights rounded at the first of the [`Resolution`]s (20 ms, then 10 ms) that does
//!    not call the run regular ([`fingerprint`]). Regular runs (a narrow range, few distinct
//!    values, or mostly one value) are left to the timing rules: they round to a few values that
//!    steady human stretches and other scripts of the same interval share. 10 ms reaches
//!    jittered intervals too narrow for 20 ms; 20 ms tolerates more jitter between accounts.
//! 2. **Users per fingerprint**, per fingerprint ([`FingerprintUsers`]): the distinct users that
//!    produced it within `window_s` (of the time sightings carry: in the stream the processor's
//!    clock, since an agent's clock is its user's to forge). Once `min_accounts` share one, the stage
//!    emits a [`Candidate`].
//! 3. **Fleets**, over all candidates ([`FleetGraph`]): two accounts are linked once they share
//!    `min_shared` distinct fingerprints; linked accounts form a fleet when there are
//!    `min_accounts` of them, each linked to `min_links` others of it. A fleet is reported once
//!    it has settled (no account joined for `settle_s` of processing time), naming every
//!    account; an account that joins later is reported in a new alert that names the whole
//!    fleet again with the newcomers marked.
//!
//! # Why humans do not form fleets
//! Over the whole human data set (11,155 users, all time, no time window), runs of 12 flights
//! quantised to 20 ms were shared by at most 2 users and runs of 10 flights by at most 4 (121
//! keys by 3 or more); within a window of minutes, and with two distinct shared fingerprints
//! per link, the measured count of human fleets is in `docs/detection.md`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::recurrence::{RecurrenceConfig, RecurrenceMemory};

/// Fleet detection settings (`[detector.fleet]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Whether fingerprints are emitted at all.
    pub enabled: bool,
    /// Flights hashed into one fingerprint.
    pub flights: usize,
    /// How runs are rounded and which are too regular to share, tried in order: a run gets the
    /// fingerprint of the first resolution that does not call it regular, so one coincidence
    /// between two humans never counts as two shared fingerprints.
    pub resolutions: Vec<Resolution>,
    /// One run in this many (by its hash) is a fingerprint.
    pub anchor_one_in: u32,
    /// Horizon within which sharing counts, seconds (of the sightings' time).
    pub window_s: u64,
    /// Accounts that make a fleet.
    pub min_accounts: usize,
    /// Distinct shared fingerprints that link two accounts.
    pub min_shared: usize,
    /// Linked accounts each account of a fleet needs inside it: one link alone (a coincidence
    /// with any one of a fleet's many runs) does not pull an account in.
    pub min_links: usize,
    /// Processing time without a new account before a fleet is reported, seconds.
    pub settle_s: u64,
    /// Users remembered per fingerprint (a fingerprint shared by more is a fleet anyway).
    pub max_users_per_fingerprint: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flights: 10,
            resolutions: vec![
                // Scripts whose flights spread widely: robust to a few ms of jitter per account.
                Resolution { quantum_ms: 20, min_range_ms: 30, min_distinct_quanta: 4, max_repeated_quanta: 10 },
                // A jittered interval too narrow for 20 ms (a few values there, which steady
                // human stretches share), but not a constant or a timer's ticks.
                Resolution { quantum_ms: 10, min_range_ms: 20, min_distinct_quanta: 3, max_repeated_quanta: 6 },
            ],
            anchor_one_in: 4,
            window_s: 900,
            min_accounts: 3,
            min_shared: 2,
            min_links: 2,
            settle_s: 30,
            max_users_per_fingerprint: 32,
        }
    }
}

/// One way of rounding runs into fingerprints (`[[detector.fleet.resolutions]]`), with the rule
/// that turns regular runs away: those are shared by chance with humans' steady stretches (and
/// with other scripts of the same interval), and the timing rules catch them per account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolution {
    /// Quantum the flights are rounded to, ms.
    pub quantum_ms: u16,
    /// Runs whose flights span less than this are regular, ms.
    pub min_range_ms: u16,
    /// Distinct rounded flights a run needs.
    pub min_distinct_quanta: usize,
    /// Most flights of a run that may round to one value: a run mostly of one value (a timer's
    /// tick with an occasional extra tick) is regular however wide it spans.
    pub max_repeated_quanta: usize,
}

impl Resolution {
    /// Whether a run of these flights (sorted) is regular at this resolution.
    fn is_regular(&self, sorted_flights: &[u16]) -> bool {
        let (Some(&lo), Some(&hi)) = (sorted_flights.first(), sorted_flights.last()) else { return true };
        if hi - lo < self.min_range_ms {
            return true;
        }
        // Rounding keeps the order, so equal values are neighbours.
        let (mut distinct, mut longest, mut current, mut previous) = (0, 0, 0, None);
        for q in sorted_flights.iter().map(|&f| round(f, self.quantum_ms)) {
            if previous == Some(q) {
                current += 1;
            } else {
                distinct += 1;
                current = 1;
                previous = Some(q);
            }
            longest = longest.max(current);
        }
        distinct < self.min_distinct_quanta || longest > self.max_repeated_quanta
    }
}

/// Most resolutions a configuration may list.
pub const MAX_RESOLUTIONS: usize = 4;

impl FleetConfig {
    /// Checks what the stages depend on.
    pub fn validate(&self, recurrence: &RecurrenceConfig) -> Result<(), String> {
        if self.enabled && !recurrence.enabled {
            return Err("fleet fingerprints read the recurrence memory: enable recurrence or disable fleet".into());
        }
        if !(4..=MAX_FLIGHTS).contains(&self.flights) || self.flights > recurrence.memory_presses {
            return Err("fleet.flights must be between 4 and 64 (and within recurrence.memory_presses)".into());
        }
        if self.enabled && !(1..=MAX_RESOLUTIONS).contains(&self.resolutions.len()) {
            return Err(format!("fleet.resolutions must list 1 to {MAX_RESOLUTIONS} resolutions"));
        }
        for r in &self.resolutions {
            if r.quantum_ms == 0 {
                return Err("fleet.resolutions: quantum_ms must be positive".into());
            }
            if r.min_distinct_quanta > self.flights || r.max_repeated_quanta == 0 {
                return Err("fleet.resolutions: min_distinct_quanta must be at most fleet.flights and max_repeated_quanta positive".into());
            }
        }
        if self.anchor_one_in == 0 || self.window_s == 0 {
            return Err("fleet.anchor_one_in and window_s must be positive".into());
        }
        if self.min_accounts < 2 || self.min_shared == 0 {
            return Err("fleet needs min_accounts >= 2 and min_shared >= 1".into());
        }
        if self.min_links == 0 || self.min_links >= self.min_accounts {
            return Err("fleet.min_links must be between 1 and min_accounts - 1".into());
        }
        if self.max_users_per_fingerprint < self.min_accounts || self.max_users_per_fingerprint > 1024 {
            return Err("fleet.max_users_per_fingerprint must be between min_accounts and 1024".into());
        }
        Ok(())
    }

    fn window_us(&self) -> i64 {
        i64::try_from(self.window_s.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
    }
}

/// Most flights one fingerprint hashes.
pub const MAX_FLIGHTS: usize = 64;

/// The fingerprint of the run ending at the memory's latest press, when that run is an anchor:
/// at the first resolution that does not call the run regular (none if all do).
pub fn fingerprint(memory: &RecurrenceMemory, recurrence: &RecurrenceConfig, cfg: &FleetConfig) -> Option<u64> {
    if !cfg.enabled {
        return None;
    }
    let mut flights = [0u16; MAX_FLIGHTS];
    let flights = &mut flights[..cfg.flights.min(MAX_FLIGHTS)];
    if !memory.latest_flights(recurrence, flights) {
        return None;
    }
    flights.reverse();
    // This runs at every settled press: the hashes first (most runs are no resolution's anchor),
    // then the regularity of the run, from its flights sorted once.
    let mut hashes = [0u64; MAX_RESOLUTIONS];
    let hashes = &mut hashes[..cfg.resolutions.len().min(MAX_RESOLUTIONS)];
    for (h, resolution) in hashes.iter_mut().zip(&cfg.resolutions) {
        *h = fnv1a(resolution.quantum_ms, flights);
    }
    let is_anchor = |h: u64| h % u64::from(cfg.anchor_one_in) == 0;
    if !hashes.iter().any(|&h| is_anchor(h)) {
        return None;
    }
    flights.sort_unstable();
    let (h, _) = hashes.iter().zip(&cfg.resolutions).find(|(_, r)| !r.is_regular(flights))?;
    is_anchor(*h).then_some(*h)
}

/// FNV-1a, 64 bits, over the quantum (so resolutions never share a hash) and the flights
/// rounded to it, oldest first.
fn fnv1a(quantum_ms: u16, flights: &[u16]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let quanta = flights.iter().map(|&f| round(f, quantum_ms));
    for value in std::iter::once(quantum_ms).chain(quanta) {
        for byte in value.to_le_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A flight rounded to the nearest multiple of `quantum_ms` (as a count of quanta).
fn round(flight_ms: u16, quantum_ms: u16) -> u16 {
    (flight_ms + quantum_ms / 2) / quantum_ms
}

/// A fingerprint some user produced: what the first stage sends to the second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintSeen {
    /// Who produced it.
    pub user: String,
    /// When: the processor's clock in the stream (event time offline).
    pub at_us: i64,
}

/// The users that produced one fingerprint recently (the second stage's state per fingerprint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintUsers {
    /// `(user, time of their latest sighting)`, at most `max_users_per_fingerprint`.
    users: Vec<(String, i64)>,
}

/// Users sharing one fingerprint: what the second stage sends to the third.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The shared fingerprint.
    pub fingerprint: u64,
    /// Every user that produced it within the window, sorted.
    pub users: Vec<String>,
    /// Time of the latest sighting.
    pub at_us: i64,
}

impl FingerprintUsers {
    /// Records `seen` for `fingerprint`. Returns a candidate when a user new to it makes the
    /// sharers `min_accounts` or more.
    pub fn observe(&mut self, cfg: &FleetConfig, fingerprint: u64, seen: &FingerprintSeen) -> Option<Candidate> {
        let horizon = seen.at_us.saturating_sub(cfg.window_us());
        self.users.retain(|(_, at)| *at >= horizon);
        if let Some(entry) = self.users.iter_mut().find(|(u, _)| *u == seen.user) {
            entry.1 = entry.1.max(seen.at_us);
            return None;
        }
        if self.users.len() >= cfg.max_users_per_fingerprint {
            let oldest = self.users.iter().enumerate().min_by_key(|(_, (_, at))| *at).map(|(i, _)| i);
            if let Some(i) = oldest {
                self.users.swap_remove(i);
            }
        }
        self.users.push((seen.user.clone(), seen.at_us));
        (self.users.len() >= cfg.min_accounts).then(|| {
            let mut users: Vec<String> = self.users.iter().map(|(u, _)| u.clone()).collect();
            users.sort();
            Candidate { fingerprint, users, at_us: self.newest_us().unwrap_or(seen.at_us) }
        })
    }

    /// The latest sighting, for expiry.
    pub fn newest_us(&self) -> Option<i64> {
        self.users.iter().map(|(_, at)| *at).max()
    }

    /// Users remembered.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when nobody is remembered.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Most distinct fingerprints kept per link (enough to tell how strong it is).
pub const FINGERPRINTS_PER_LINK: usize = 16;

/// Two accounts' shared fingerprints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Distinct fingerprints both produced, at most [`FINGERPRINTS_PER_LINK`].
    pub fingerprints: Vec<u64>,
    /// Event time of the first sharing.
    pub first_us: i64,
    /// Event time of the latest sharing.
    pub last_us: i64,
}

/// An account in a fleet-sized group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Processing time (µs since the epoch) it joined a fleet-sized group.
    pub joined_us: i64,
    /// Whether an alert has named it.
    pub reported: bool,
}

/// One change to the third stage's state, for its store and changelog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphChange {
    /// A link was written (`Some`) or expired (`None`).
    Link(String, String, Option<Link>),
    /// A member was written or expired.
    Member(String, Option<Member>),
    /// The stage's event time moved.
    StreamTime(i64),
}

/// A fleet to alert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetReport {
    /// Deterministic: the accounts and the first sharing's time.
    pub fleet_id: uuid::Uuid,
    /// Every account of the fleet, sorted.
    pub accounts: Vec<String>,
    /// The accounts no earlier alert named, sorted.
    pub new_accounts: Vec<String>,
    /// Links between them with at least `min_shared` fingerprints.
    pub links: u32,
    /// Distinct fingerprints the links share.
    pub fingerprints: u32,
    /// Event time of the first sharing.
    pub first_us: i64,
    /// Event time of the latest sharing.
    pub last_us: i64,
}

/// Namespace for fleet ids (UUID v5), fixed forever so replays reproduce ids.
const FLEET_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d65_7472_6f6e_6f6d_6566_6c65_6574_7331);

/// The third stage's state: links between accounts and the fleets they form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetGraph {
    links: BTreeMap<(String, String), Link>,
    members: BTreeMap<String, Member>,
    stream_time_us: i64,
    changes: Vec<GraphChange>,
}

impl FleetGraph {
    /// A graph from stored parts (the stage's store at open).
    pub fn from_parts(
        links: impl IntoIterator<Item = ((String, String), Link)>,
        members: impl IntoIterator<Item = (String, Member)>,
        stream_time_us: i64,
    ) -> Self {
        Self {
            links: links.into_iter().collect(),
            members: members.into_iter().collect(),
            stream_time_us,
            changes: Vec::new(),
        }
    }

    /// Links held.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Adds a candidate's sharing to every pair of its users.
    pub fn observe(&mut self, candidate: &Candidate) {
        if candidate.at_us > self.stream_time_us {
            self.stream_time_us = candidate.at_us;
            self.changes.push(GraphChange::StreamTime(candidate.at_us));
        }
        let users: BTreeSet<&String> = candidate.users.iter().collect();
        let users: Vec<&String> = users.into_iter().collect();
        for (i, a) in users.iter().enumerate() {
            for b in &users[i + 1..] {
                let key = ((*a).clone(), (*b).clone());
                let link = self.links.entry(key.clone()).or_insert_with(|| Link {
                    fingerprints: Vec::new(),
                    first_us: candidate.at_us,
                    last_us: candidate.at_us,
                });
                let new_fingerprint = link.fingerprints.len() < FINGERPRINTS_PER_LINK
                    && !link.fingerprints.contains(&candidate.fingerprint);
                if new_fingerprint {
                    link.fingerprints.push(candidate.fingerprint);
                }
                let (first, last) = (link.first_us.min(candidate.at_us), link.last_us.max(candidate.at_us));
                if new_fingerprint || first != link.first_us || last != link.last_us {
                    link.first_us = first;
                    link.last_us = last;
                    self.changes.push(GraphChange::Link(key.0, key.1, Some(link.clone())));
                }
            }
        }
    }

    /// Expires what fell out of the window, registers accounts that joined fleet-sized groups
    /// at processing time `now_us`, and reports the fleets that have settled.
    pub fn decide(&mut self, cfg: &FleetConfig, now_us: i64) -> Vec<FleetReport> {
        self.expire(cfg);
        let settle_us = i64::try_from(cfg.settle_s.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
        let mut reports = Vec::new();
        for group in self.groups(cfg) {
            for account in &group {
                if !self.members.contains_key(account) {
                    let member = Member { joined_us: now_us, reported: false };
                    self.members.insert(account.clone(), member);
                    self.changes.push(GraphChange::Member(account.clone(), Some(member)));
                }
            }
            let fresh: Vec<&String> = group.iter().filter(|a| !self.members[*a].reported).collect();
            let settled = fresh.iter().map(|a| self.members[*a].joined_us).max();
            match settled {
                Some(joined) if now_us.saturating_sub(joined) >= settle_us => {}
                _ => continue,
            }
            let new_accounts: Vec<String> = fresh.into_iter().cloned().collect();
            for account in &new_accounts {
                let member = self.members.get_mut(account).expect("registered above");
                member.reported = true;
                self.changes.push(GraphChange::Member(account.clone(), Some(*member)));
            }
            reports.push(self.report(cfg, group, new_accounts));
        }
        reports
    }

    /// The changes since the last call, in order.
    pub fn take_changes(&mut self) -> Vec<GraphChange> {
        std::mem::take(&mut self.changes)
    }

    fn expire(&mut self, cfg: &FleetConfig) {
        let horizon = self.stream_time_us.saturating_sub(cfg.window_us());
        let stale: Vec<(String, String)> =
            self.links.iter().filter(|(_, l)| l.last_us < horizon).map(|(k, _)| k.clone()).collect();
        for key in stale {
            self.links.remove(&key);
            self.changes.push(GraphChange::Link(key.0, key.1, None));
        }
        let linked: BTreeSet<&String> = self.links.keys().flat_map(|(a, b)| [a, b]).collect();
        let gone: Vec<String> = self.members.keys().filter(|m| !linked.contains(m)).cloned().collect();
        for member in gone {
            self.members.remove(&member);
            self.changes.push(GraphChange::Member(member, None));
        }
    }

    /// Connected components of the strong links with at least `min_accounts` accounts, each
    /// sorted, in order of their smallest account; among accounts with at least `min_links`
    /// strong links to others that have as many (a k-core), so a fleet is a group in which every
    /// account shares the script with several others.
    fn groups(&self, cfg: &FleetConfig) -> Vec<Vec<String>> {
        let mut strong: Vec<(&String, &String)> = self
            .links
            .iter()
            .filter(|(_, link)| link.fingerprints.len() >= cfg.min_shared)
            .map(|((a, b), _)| (a, b))
            .collect();
        loop {
            let mut degree: BTreeMap<&String, usize> = BTreeMap::new();
            for (a, b) in &strong {
                *degree.entry(a).or_default() += 1;
                *degree.entry(b).or_default() += 1;
            }
            let before = strong.len();
            strong.retain(|(a, b)| degree[a] >= cfg.min_links && degree[b] >= cfg.min_links);
            if strong.len() == before {
                break;
            }
        }
        let mut parent: BTreeMap<&String, &String> = BTreeMap::new();
        fn root<'a>(parent: &mut BTreeMap<&'a String, &'a String>, x: &'a String) -> &'a String {
            let mut r = x;
            while let Some(&p) = parent.get(r) {
                if p == r {
                    break;
                }
                r = p;
            }
            parent.insert(x, r);
            r
        }
        for (a, b) in strong {
            parent.entry(a).or_insert(a);
            parent.entry(b).or_insert(b);
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            if ra != rb {
                let (low, high) = if ra < rb { (ra, rb) } else { (rb, ra) };
                parent.insert(high, low);
            }
        }
        let nodes: Vec<&String> = parent.keys().copied().collect();
        let mut groups: BTreeMap<&String, Vec<String>> = BTreeMap::new();
        for node in nodes {
            let r = root(&mut parent, node);
            groups.entry(r).or_default().push(node.clone());
        }
        groups.into_values().filter(|g| g.len() >= cfg.min_accounts).collect()
    }

    fn report(&self, cfg: &FleetConfig, accounts: Vec<String>, new_accounts: Vec<String>) -> FleetReport {
        let inside: BTreeSet<&String> = accounts.iter().collect();
        let strong: Vec<&Link> = self
            .links
            .iter()
            .filter(|((a, b), l)| inside.contains(a) && inside.contains(b) && l.fingerprints.len() >= cfg.min_shared)
            .map(|(_, l)| l)
            .collect();
        let fingerprints: BTreeSet<u64> = strong.iter().flat_map(|l| l.fingerprints.iter().copied()).collect();
        let first_us = strong.iter().map(|l| l.first_us).min().unwrap_or(0);
        let last_us = strong.iter().map(|l| l.last_us).max().unwrap_or(0);
        let name = format!("{}\u{1f}{first_us}", accounts.join("\u{1f}"));
        FleetReport {
            fleet_id: uuid::Uuid::new_v5(&FLEET_ID_NAMESPACE, name.as_bytes()),
            accounts,
            new_accounts,
            links: strong.len() as u32,
            fingerprints: fingerprints.len() as u32,
            first_us,
            last_us,
        }
    }
}

/// The second and third steps over whole recordings at once (evaluation and tests): every
/// sighting in event-time order through the users per fingerprint, the candidates into the
/// graph, decided as a stream replayed at its own pace would be (event time standing in for
/// processing time), and once more at the end, when every fleet has settled.
pub fn fleets_offline(cfg: &FleetConfig, sightings: &mut [(u64, FingerprintSeen)]) -> Vec<FleetReport> {
    sightings.sort_by(|a, b| (a.1.at_us, &a.1.user, a.0).cmp(&(b.1.at_us, &b.1.user, b.0)));
    let mut users: std::collections::HashMap<u64, FingerprintUsers> = std::collections::HashMap::new();
    let mut graph = FleetGraph::default();
    let mut reports = Vec::new();
    for (fingerprint, seen) in sightings.iter() {
        if let Some(candidate) = users.entry(*fingerprint).or_default().observe(cfg, *fingerprint, seen) {
            graph.observe(&candidate);
            reports.extend(graph.decide(cfg, seen.at_us));
        }
    }
    reports.extend(graph.decide(cfg, i64::MAX));
    reports
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::window::Press;

    fn cfg() -> FleetConfig {
        FleetConfig { anchor_one_in: 1, settle_s: 10, ..FleetConfig::default() }
    }

    fn memory_of(flights_ms: &[i64]) -> RecurrenceMemory {
        let rc = RecurrenceConfig::default();
        let mut m = RecurrenceMemory::default();
        let mut t = 1_000_000;
        for f in flights_ms {
            t += f * 1000;
            m.push(&rc, &Press { down_us: t, key: 30, hold_us: 60_000, repeats: 0 });
        }
        m
    }

    fn fp(flights_ms: &[i64], cfg: &FleetConfig) -> Option<u64> {
        fingerprint(&memory_of(flights_ms), &RecurrenceConfig::default(), cfg)
    }

    #[test]
    fn a_run_jittered_inside_its_quanta_keeps_its_fingerprint() {
        let run = [140, 260, 100, 180, 320, 120, 220, 160, 280, 200, 240];
        let jittered: Vec<i64> = run.iter().enumerate().map(|(i, f)| f + if i % 2 == 0 { 4 } else { -4 }).collect();
        let c = cfg();
        assert!(fp(&run, &c).is_some());
        assert_eq!(fp(&run, &c), fp(&jittered, &c));
        let other: Vec<i64> = run.iter().map(|f| f + 20).collect();
        assert_ne!(fp(&run, &c), fp(&other, &c));
    }

    #[test]
    fn regular_runs_pauses_and_short_memories_have_no_fingerprint() {
        let c = cfg();
        assert_eq!(fp(&[100; 12], &c), None, "regular runs are the timing rules'");
        let timer = [94, 94, 94, 125, 94, 94, 93, 94, 125, 94, 95];
        assert_eq!(fp(&timer, &c), None, "a timer's tick with an extra tick now and then");
        assert_eq!(fp(&[130, 250, 90, 170], &c), None, "too few presses");
        assert_eq!(fp(&[130, 250, 90, 170, 330, 110, 3_000, 150, 270, 190, 230], &c), None, "a pause inside");
        let off = FleetConfig { enabled: false, ..c };
        assert_eq!(fp(&[130, 250, 90, 170, 330, 110, 210, 150, 270, 190, 230], &off), None);
    }

    #[test]
    fn a_narrow_jittered_interval_is_fingerprinted_at_the_fine_resolution_only() {
        let c = cfg();
        let narrow = [100, 120, 140, 120, 100, 130, 140, 110, 100, 120, 140];
        let coarse_only = FleetConfig { resolutions: c.resolutions[..1].to_vec(), ..c.clone() };
        assert_eq!(fp(&narrow, &coarse_only), None, "three values at 20 ms: shared with steady humans");
        let fine = fp(&narrow, &c).expect("five values at 10 ms");
        let jittered: Vec<i64> = narrow.iter().enumerate().map(|(i, f)| f + if i % 2 == 0 { 2 } else { -2 }).collect();
        assert_eq!(fp(&jittered, &c), Some(fine), "a few ms of an account's own jitter");
        let fine_only = FleetConfig { resolutions: c.resolutions[1..].to_vec(), ..c.clone() };
        let wide = [140, 260, 100, 180, 320, 120, 220, 160, 280, 200, 240];
        assert_ne!(fp(&wide, &c), fp(&wide, &fine_only), "a run is fingerprinted at one resolution, the first");
    }

    #[test]
    fn only_anchors_are_fingerprints() {
        let c = FleetConfig { anchor_one_in: 8, ..cfg() };
        let mut rng_flights: Vec<i64> = Vec::new();
        let mut x: u64 = 7;
        let mut found = 0;
        for _ in 0..2_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            rng_flights.push(60 + (x >> 33) as i64 % 300);
            if rng_flights.len() > 10 && fp(&rng_flights[rng_flights.len() - 11..], &c).is_some() {
                found += 1;
            }
        }
        assert!((150..350).contains(&found), "about one run in 8: {found}");
    }

    fn seen(user: &str, at_s: i64) -> FingerprintSeen {
        FingerprintSeen { user: user.into(), at_us: at_s * 1_000_000 }
    }

    #[test]
    fn a_fingerprint_becomes_a_candidate_when_enough_distinct_users_share_it() {
        let c = cfg();
        let mut users = FingerprintUsers::default();
        assert_eq!(users.observe(&c, 9, &seen("a", 1)), None);
        assert_eq!(users.observe(&c, 9, &seen("a", 2)), None, "the same user twice is one");
        assert_eq!(users.observe(&c, 9, &seen("b", 3)), None);
        let candidate = users.observe(&c, 9, &seen("c", 4)).expect("three users");
        assert_eq!(candidate.users, ["a", "b", "c"]);
        assert_eq!(candidate.at_us, 4_000_000);
        assert_eq!(users.observe(&c, 9, &seen("c", 5)), None, "nobody new");
        assert_eq!(users.observe(&c, 9, &seen("d", 6)).map(|c| c.users.len()), Some(4));
    }

    #[test]
    fn sharing_counts_only_within_the_window_and_the_memory_is_bounded() {
        let c = FleetConfig { window_s: 60, max_users_per_fingerprint: 4, ..cfg() };
        let mut users = FingerprintUsers::default();
        users.observe(&c, 1, &seen("a", 0));
        users.observe(&c, 1, &seen("b", 10));
        assert_eq!(users.observe(&c, 1, &seen("c", 100)), None, "a and b are older than the window");
        assert_eq!(users.len(), 1);
        for (i, u) in ["d", "e", "f", "g", "h"].iter().enumerate() {
            users.observe(&c, 1, &seen(u, 101 + i as i64));
        }
        assert_eq!(users.len(), 4);
    }

    fn candidate(fingerprint: u64, users: &[&str], at_s: i64) -> Candidate {
        Candidate { fingerprint, users: users.iter().map(|u| (*u).to_owned()).collect(), at_us: at_s * 1_000_000 }
    }

    const S: i64 = 1_000_000;

    #[test]
    fn a_fleet_is_reported_once_when_it_has_settled_naming_every_account() {
        let c = cfg();
        let mut g = FleetGraph::default();
        g.observe(&candidate(1, &["a", "b", "c"], 10));
        assert!(g.decide(&c, 100 * S).is_empty(), "one shared fingerprint is no link yet");
        g.observe(&candidate(2, &["a", "b", "c"], 11));
        assert!(g.decide(&c, 101 * S).is_empty(), "not settled");
        g.observe(&candidate(3, &["c", "d", "e", "f"], 12));
        g.observe(&candidate(4, &["c", "d", "e", "f"], 13));
        assert!(g.decide(&c, 105 * S).is_empty(), "d, e and f just joined");
        let reports = g.decide(&c, 115 * S);
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!(r.accounts, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(r.new_accounts, r.accounts);
        assert_eq!((r.first_us, r.last_us, r.fingerprints), (10 * S, 13 * S, 4));
        assert!(g.decide(&c, 500 * S).is_empty(), "reported once");
        g.observe(&candidate(5, &["a", "b", "g", "h"], 14));
        g.observe(&candidate(6, &["a", "b", "g"], 15));
        assert!(g.decide(&c, 501 * S).is_empty());
        let grown = g.decide(&c, 520 * S);
        assert_eq!(grown.len(), 1);
        assert_eq!(grown[0].new_accounts, ["g"], "h shares only one fingerprint");
        assert_eq!(grown[0].accounts.len(), 7);
        assert_ne!(grown[0].fleet_id, r.fleet_id);
    }

    #[test]
    fn an_account_linked_to_one_member_only_is_not_pulled_into_the_fleet() {
        let c = cfg();
        let mut g = FleetGraph::default();
        g.observe(&candidate(1, &["a", "b", "c", "d"], 10));
        g.observe(&candidate(2, &["a", "b", "c", "d"], 11));
        // A person whose two runs happen to match one account's, each shared with others too.
        g.observe(&candidate(3, &["a", "b", "person"], 12));
        g.observe(&candidate(4, &["a", "c", "person"], 13));
        assert!(g.decide(&c, 100 * S).is_empty(), "not settled");
        let reports = g.decide(&c, 115 * S);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].accounts, ["a", "b", "c", "d"], "linked to a alone (b and c once each)");
        let one_link = FleetConfig { min_links: 1, ..c.clone() };
        let mut g = FleetGraph::default();
        for (i, users) in [["a", "b", "c", "d"], ["a", "b", "c", "d"]].iter().enumerate() {
            g.observe(&candidate(i as u64 + 1, users, 10 + i as i64));
        }
        g.observe(&candidate(3, &["a", "b", "person"], 12));
        g.observe(&candidate(4, &["a", "c", "person"], 13));
        g.decide(&one_link, 100 * S);
        assert_eq!(g.decide(&one_link, 115 * S)[0].accounts.len(), 5, "one link is enough without the rule");
    }

    #[test]
    fn two_accounts_are_no_fleet_and_old_links_expire() {
        let c = FleetConfig { window_s: 60, ..cfg() };
        let mut g = FleetGraph::default();
        g.observe(&candidate(1, &["a", "b"], 0));
        g.observe(&candidate(2, &["a", "b"], 1));
        assert!(g.decide(&c, 100 * S).is_empty());
        g.observe(&candidate(3, &["x", "y", "z"], 1_000));
        g.decide(&c, 100 * S);
        assert_eq!(g.links(), 3, "a-b expired, x-y-z remain");
        let changes = g.take_changes();
        assert!(changes.contains(&GraphChange::Link("a".into(), "b".into(), None)));
        assert!(changes.contains(&GraphChange::StreamTime(1_000 * S)));
    }

    #[test]
    fn a_graph_rebuilt_from_its_changes_decides_the_same() {
        let c = cfg();
        let mut g = FleetGraph::default();
        for (i, users) in [["a", "b", "c"], ["a", "b", "c"], ["b", "c", "d"], ["b", "c", "d"]].iter().enumerate() {
            g.observe(&candidate(i as u64, users, i as i64));
        }
        assert!(g.decide(&c, 0).is_empty());
        let (mut links, mut members, mut time) = (BTreeMap::new(), BTreeMap::new(), 0);
        for change in g.take_changes() {
            match change {
                GraphChange::Link(a, b, Some(l)) => drop(links.insert((a, b), l)),
                GraphChange::Link(a, b, None) => drop(links.remove(&(a, b))),
                GraphChange::Member(m, Some(v)) => drop(members.insert(m, v)),
                GraphChange::Member(m, None) => drop(members.remove(&m)),
                GraphChange::StreamTime(t) => time = t,
            }
        }
        let mut rebuilt = FleetGraph::from_parts(links, members, time);
        assert_eq!(rebuilt.decide(&c, 20 * S), g.decide(&c, 20 * S));
    }
}
