//! What each task is doing, shared with whoever reports readiness (`/readyz`) and metrics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::metrics::events::{InternalEvent, TaskPhaseChanged};

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
    /// The processor has set up its topics and joined the group.
    started: AtomicBool,
}

impl Status {
    pub(crate) fn set(&self, partition: i32, phase: TaskPhase) {
        let mut tasks = self.lock();
        tasks.insert(partition, phase);
        let ratio = match phase {
            TaskPhase::Restoring { replayed, total } if total > 0 => replayed as f64 / total as f64,
            TaskPhase::Restoring { .. } => 0.0,
            TaskPhase::Running => 1.0,
        };
        Self::report(&tasks, partition, Some(ratio));
    }

    pub(crate) fn remove(&self, partition: i32) {
        let mut tasks = self.lock();
        tasks.remove(&partition);
        Self::report(&tasks, partition, None);
    }

    pub(crate) fn set_started(&self, started: bool) {
        self.started.store(started, Ordering::SeqCst);
    }

    /// Whether the processor has set up its topics and subscribed.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    fn report(tasks: &BTreeMap<i32, TaskPhase>, partition: i32, restored_ratio: Option<f64>) {
        let running = tasks.values().filter(|p| **p == TaskPhase::Running).count();
        TaskPhaseChanged { partition, restored_ratio, restoring: tasks.len() - running, running }.emit();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, TaskPhase>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every task's phase.
    pub fn tasks(&self) -> BTreeMap<i32, TaskPhase> {
        self.lock().clone()
    }

    /// Every assigned task has finished restoring (true with none assigned).
    pub fn tasks_restored(&self) -> bool {
        self.lock().values().all(|p| *p == TaskPhase::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_no_task_restores() {
        let s = Status::default();
        assert!(s.tasks_restored());
        s.set(0, TaskPhase::Restoring { replayed: 1, total: 9 });
        s.set(1, TaskPhase::Running);
        assert!(!s.tasks_restored());
        s.set(0, TaskPhase::Running);
        assert!(s.tasks_restored());
        s.remove(1);
        assert_eq!(s.tasks().len(), 1);
    }
}
