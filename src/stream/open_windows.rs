//! The open windows a task remembers between batches, indexed for the two questions every batch
//! asks of them: who has been quiet past the idle timeout, and, over the cap on open users, whom
//! to close first.
//!
//! A scan of every open window per batch made a flood of new ids quadratic: with the default cap
//! of 100,000 open users, each batch of a few hundred records walked and partly sorted all of
//! them. Two ordered indexes answer both questions from their first entries instead, at the cost
//! of a logarithmic update per user a batch feeds.
//!
//! # Layout
//! - [`OpenWindows`]: the users with an open window, by id, by quiet and by closing order.
//! - [`OpenWindows::first_to_close`]: the closing order over the open windows and the windows a
//!   batch fed (which count as active now).
//!
//! Pure: no store, no clients; the processor's clock comes in as [`Instant`]s.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An open window, as the task remembers it between batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpenWindow {
    /// When the user's last event arrived (the processor's clock).
    at: Instant,
    /// Presses in the window.
    presses: usize,
}

/// The users whose window has presses, each with when their last event arrived and how many
/// presses their window holds.
#[derive(Debug, Default)]
pub struct OpenWindows {
    by_user: HashMap<Arc<str>, OpenWindow>,
    /// Longest quiet first.
    by_quiet: BTreeSet<(Instant, Arc<str>)>,
    /// Closing order: fewest presses, then longest quiet, then by id.
    by_closing: BTreeSet<(usize, Instant, Arc<str>)>,
}

impl OpenWindows {
    /// Users with an open window.
    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    /// Whether `user` has an open window.
    pub fn contains(&self, user: &str) -> bool {
        self.by_user.contains_key(user)
    }

    /// Records that `user`'s last event arrived at `at` and their window holds `presses`.
    pub fn touch(&mut self, user: &str, at: Instant, presses: usize) {
        let key: Arc<str> = match self.by_user.get_key_value(user) {
            Some((key, old)) => {
                let (key, old) = (key.clone(), *old);
                self.unindex(&key, old);
                key
            }
            None => Arc::from(user),
        };
        self.by_quiet.insert((at, key.clone()));
        self.by_closing.insert((presses, at, key.clone()));
        self.by_user.insert(key, OpenWindow { at, presses });
    }

    /// Forgets `user`'s window (closed); a user without one is left as is.
    pub fn remove(&mut self, user: &str) {
        if let Some((key, old)) = self.by_user.remove_entry(user) {
            self.unindex(&key, old);
        }
    }

    /// Forgets every window.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    fn unindex(&mut self, key: &Arc<str>, old: OpenWindow) {
        self.by_quiet.remove(&(old.at, key.clone()));
        self.by_closing.remove(&(old.presses, old.at, key.clone()));
    }

    /// Whether some user has been quiet for `timeout` at `now`.
    pub fn idle_due(&self, now: Instant, timeout: Duration) -> bool {
        self.by_quiet.first().is_some_and(|(at, _)| now.saturating_duration_since(*at) >= timeout)
    }

    /// The users quiet for `timeout` at `now`, longest quiet first.
    pub fn idle(&self, now: Instant, timeout: Duration) -> impl Iterator<Item = &str> {
        self.by_quiet
            .iter()
            .take_while(move |(at, _)| now.saturating_duration_since(*at) >= timeout)
            .map(|(_, user)| &**user)
    }

    /// The `count` users to close first among the open windows and the windows `active` in the
    /// batch at hand (each with its presses now; an open user among them counts as active, not
    /// by its remembered entry): fewest presses first, at equal presses the quiet before the
    /// active, the longest quiet first, then by id. Users for which `closing` holds are closing
    /// already and are passed over.
    pub fn first_to_close(
        &self,
        count: usize,
        active: &[(usize, &str)],
        closing: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut active: Vec<(usize, &str)> = active.to_vec();
        active.sort_unstable();
        let mut active_ids: Vec<&str> = active.iter().map(|(_, user)| *user).collect();
        active_ids.sort_unstable();
        let mut quiet = self
            .by_closing
            .iter()
            .filter(|(_, _, user)| !closing(user) && active_ids.binary_search(&&**user).is_err())
            .map(|(presses, _, user)| (*presses, &**user))
            .peekable();
        let mut active = active.into_iter().filter(|(_, user)| !closing(user)).peekable();
        let mut chosen = Vec::with_capacity(count);
        while chosen.len() < count {
            let take_quiet = match (quiet.peek(), active.peek()) {
                (Some(q), Some(a)) => q.0 <= a.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_quiet { quiet.next() } else { active.next() };
            chosen.extend(next.map(|(_, user)| user.to_owned()));
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, s: u64) -> Instant {
        base + Duration::from_secs(s)
    }

    #[test]
    fn touching_a_user_again_moves_them_in_both_orders() {
        let t0 = Instant::now();
        let mut open = OpenWindows::default();
        open.touch("a", at(t0, 0), 5);
        open.touch("b", at(t0, 1), 1);
        open.touch("a", at(t0, 30), 6);
        assert_eq!(open.len(), 2);
        assert_eq!(open.idle(at(t0, 31), Duration::from_secs(30)).collect::<Vec<_>>(), vec!["b"]);
        assert!(open.idle_due(at(t0, 31), Duration::from_secs(30)));
        assert!(!open.idle_due(at(t0, 30), Duration::from_secs(30)));
        open.remove("b");
        open.remove("never-there");
        assert!(!open.idle_due(at(t0, 59), Duration::from_secs(30)));
        assert_eq!(open.idle(at(t0, 60), Duration::from_secs(30)).collect::<Vec<_>>(), vec!["a"]);
        assert!(open.contains("a") && !open.contains("b"));
    }

    #[test]
    fn the_smallest_then_longest_quiet_close_first_and_the_active_after_the_quiet() {
        let t0 = Instant::now();
        let mut open = OpenWindows::default();
        open.touch("typist", at(t0, 0), 400);
        open.touch("one-old", at(t0, 0), 1);
        open.touch("one-new", at(t0, 5), 1);
        open.touch("two", at(t0, 1), 2);
        open.touch("fed-again", at(t0, 0), 1);
        // `fed-again` is active in this batch with 3 presses: its remembered entry is passed over.
        let active = [(1, "newcomer"), (3, "fed-again")];
        let none_closing = |_: &str| false;
        assert_eq!(open.first_to_close(2, &active, none_closing), vec!["one-old", "one-new"]);
        assert_eq!(open.first_to_close(3, &active, none_closing), vec!["one-old", "one-new", "newcomer"]);
        assert_eq!(
            open.first_to_close(9, &active, none_closing),
            vec!["one-old", "one-new", "newcomer", "two", "fed-again", "typist"]
        );
        assert_eq!(open.first_to_close(2, &active, |u| u == "one-old"), vec!["one-new", "newcomer"]);
    }

    #[test]
    fn equal_presses_and_times_close_by_id() {
        let t0 = Instant::now();
        let mut open = OpenWindows::default();
        for user in ["c", "a", "b"] {
            open.touch(user, t0, 1);
        }
        assert_eq!(open.first_to_close(2, &[], |_| false), vec!["a", "b"]);
        open.clear();
        assert!(open.len() == 0 && !open.idle_due(at(t0, 100), Duration::ZERO));
    }
}
