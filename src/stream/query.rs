//! Interactive queries: a user's live window state and latest scores, answered by the
//! processing loop from the task that owns the user's partition (so the answer is consistent
//! with what was committed, and no lock is held over a task's state).
//!
//! The HTTP side [`UserQueries::ask`]s; the loop takes the questions between
//! batches and answers each one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;

use metronome_core::detect::{UserSummary, WindowReport};

/// Latest window scores kept per user with an open window.
pub const RECENT_WINDOWS: usize = 32;

/// One scored window, as the timeline shows it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoreSample {
    /// The window's event time (its last press).
    pub window_end_us: i64,
    /// Combined score.
    pub score: f32,
    /// The timing rules' score.
    pub timing_score: f32,
    /// The interval-histogram score.
    pub histogram_score: f32,
    /// The sequence model's score, when a model ran.
    pub lstm_score: Option<f32>,
}

impl ScoreSample {
    /// The scores of a scored window, narrowed for memory.
    pub fn of(window: &WindowReport) -> Self {
        Self {
            window_end_us: window.window_end_us,
            score: window.score as f32,
            timing_score: window.timing_score as f32,
            histogram_score: window.histogram_score as f32,
            lstm_score: window.lstm_score.map(|s| s as f32),
        }
    }
}

/// The latest scores of one user, oldest first, at most [`RECENT_WINDOWS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentScores(VecDeque<ScoreSample>);

impl RecentScores {
    /// Adds the newest sample, dropping the oldest beyond the bound.
    pub fn push(&mut self, sample: ScoreSample) {
        if self.0.len() == RECENT_WINDOWS {
            self.0.pop_front();
        }
        self.0.push_back(sample);
    }

    /// The samples, oldest first.
    pub fn to_vec(&self) -> Vec<ScoreSample> {
        self.0.iter().copied().collect()
    }
}

/// A user's live state, from the owning instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserView {
    /// The user.
    pub user_id: String,
    /// The input partition that holds the user.
    pub partition: i32,
    /// The instance answering.
    pub instance: String,
    /// Whether the store holds any state for the user.
    pub known: bool,
    /// The live window and incident, in numbers.
    pub state: Option<UserSummary>,
    /// Scores of the latest windows this instance scored, oldest first.
    pub recent_windows: Vec<ScoreSample>,
}

/// The answer to one question.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// This instance owns the user's partition.
    Owned(Box<UserView>),
    /// Another instance does (or none yet): ask the owner of `partition`.
    Elsewhere {
        /// The user's partition.
        partition: i32,
    },
    /// The processor is not running (starting, stopping) or did not answer in time.
    Unavailable,
    /// [`MAX_WAITING`] questions are already waiting: asked again later, it is answered.
    Busy,
}

/// Most questions waiting for the processing loop at once. The loop answers them between
/// batches; past this many a caller is told to come back rather than queued, so a flood of
/// queries holds neither memory nor the loop's time without bound.
pub const MAX_WAITING: usize = 256;

type Question = (String, oneshot::Sender<Lookup>);

/// Questions waiting for the processing loop.
#[derive(Debug, Default)]
pub struct UserQueries {
    pending: Mutex<Vec<Question>>,
    answering: AtomicBool,
}

impl UserQueries {
    /// Asks about `user`; [`Lookup::Unavailable`] if the loop does not answer within `timeout`,
    /// [`Lookup::Busy`] if [`MAX_WAITING`] questions wait already.
    pub async fn ask(&self, user: &str, timeout: Duration) -> Lookup {
        if !self.answering.load(Ordering::SeqCst) {
            return Lookup::Unavailable;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            // Questions whose caller gave up (timed out, hung up) free their place first.
            pending.retain(|(_, tx)| !tx.is_closed());
            if pending.len() >= MAX_WAITING {
                return Lookup::Busy;
            }
            pending.push((user.to_owned(), tx));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            _ => Lookup::Unavailable,
        }
    }

    /// Questions waiting now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The questions asked since the last call (the processing loop answers them).
    pub(crate) fn take(&self) -> Vec<Question> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether the loop is there to answer; when it stops, waiting questions are answered
    /// [`Lookup::Unavailable`].
    pub(crate) fn set_answering(&self, answering: bool) {
        self.answering.store(answering, Ordering::SeqCst);
        if !answering {
            for (_, tx) in self.take() {
                let _ = tx.send(Lookup::Unavailable);
            }
        }
    }
}

/// The partition librdkafka's default partitioner (`consistent_random`) gives a non-empty key:
/// CRC-32 of the key modulo the partition count. Agents key records by user id with it.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    (crc32fast::hash(key) % partitions as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_scores_keep_the_newest() {
        let mut r = RecentScores::default();
        for i in 0..(RECENT_WINDOWS as i64 + 5) {
            r.push(ScoreSample {
                window_end_us: i,
                score: 0.0,
                timing_score: 0.0,
                histogram_score: 0.0,
                lstm_score: None,
            });
        }
        let v = r.to_vec();
        assert_eq!(v.len(), RECENT_WINDOWS);
        assert_eq!((v[0].window_end_us, v[RECENT_WINDOWS - 1].window_end_us), (5, RECENT_WINDOWS as i64 + 4));
    }

    #[test]
    fn partitions_follow_crc32() {
        // CRC-32 (IEEE) of "123456789" is 0xCBF43926.
        assert_eq!(partition_for(b"123456789", 1 << 30), (0xCBF4_3926u32 % (1 << 30)) as i32);
        assert_eq!(partition_for(b"anything", 1), 0);
        assert_eq!(partition_for(b"x", 0), 0);
    }

    #[test]
    fn unanswered_questions_are_unavailable() {
        let q = UserQueries::default();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(q.ask("u", Duration::from_millis(10))), Lookup::Unavailable);
        q.set_answering(true);
        assert_eq!(rt.block_on(q.ask("u", Duration::from_millis(10))), Lookup::Unavailable);
        assert_eq!(q.take().len(), 1, "the question waited for the loop");
    }

    #[test]
    fn past_the_bound_a_question_is_turned_away_and_one_given_up_frees_its_place() {
        let q = std::sync::Arc::new(UserQueries::default());
        q.set_answering(true);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let hour = Duration::from_secs(3600);
            let mut asking: Vec<_> = (0..MAX_WAITING)
                .map(|i| {
                    let q = std::sync::Arc::clone(&q);
                    tokio::spawn(async move { q.ask(&format!("u{i}"), hour).await })
                })
                .collect();
            while q.waiting() < MAX_WAITING {
                tokio::task::yield_now().await;
            }
            assert_eq!(q.ask("one more", hour).await, Lookup::Busy);
            let gone = asking.remove(0);
            gone.abort();
            assert!(gone.await.unwrap_err().is_cancelled());
            // The caller that gave up no longer holds a place: the next one waits (and, with
            // nobody answering within 10 ms, hears the processor is unavailable).
            assert_eq!(q.ask("next", Duration::from_millis(10)).await, Lookup::Unavailable);
            q.set_answering(false);
            for a in asking {
                assert_eq!(a.await.unwrap(), Lookup::Unavailable);
            }
        });
    }
}
