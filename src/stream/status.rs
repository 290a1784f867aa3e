//! What each task is doing, shared with whoever reports readiness (logs now, `/readyz` later).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A task's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Replaying the changelog: records replayed so far of about `total`.
    Restoring {
        /// Records replayed.
        replayed: u64,
        /// Records to replay (an upper bound: commit markers count).
        total: u64,
    },
    /// Processing records.
    Running,
}

/// Phases of the tasks this process holds, by input partition.
#[derive(Debug, Default)]
pub struct Status {
    tasks: Mutex<BTreeMap<i32, TaskPhase>>,
}

impl Status {
    pub(crate) fn set(&self, partition: i32, phase: TaskPhase) {
        self.lock().insert(partition, phase);
    }

    pub(crate) fn remove(&self, partition: i32) {
        self.lock().remove(&partition);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, TaskPhase>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every task's phase.
    pub fn tasks(&self) -> BTreeMap<i32, TaskPhase> {
        self.lock().clone()
    }

    /// Ready: every assigned task has finished restoring.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(|p| *p == TaskPhase::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_no_task_restores() {
        let s = Status::default();
        assert!(s.is_ready());
        s.set(0, TaskPhase::Restoring { replayed: 1, total: 9 });
        s.set(1, TaskPhase::Running);
        assert!(!s.is_ready());
        s.set(0, TaskPhase::Running);
        assert!(s.is_ready());
        s.remove(1);
        assert_eq!(s.tasks().len(), 1);
    }
}
