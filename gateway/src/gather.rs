//! Requests to the database gathered into batches: while one batch is in flight the next ones
//! wait together, and a task of their own (started by the first while none runs, so a request
//! that goes away strands nobody) takes them in turn until nobody waits. A lone request costs
//! what it would alone: its task starts at once. The lease asks (`leases.rs`) and the
//! PostgreSQL admission reads (`store/postgres/admission.rs`) use it.

use std::sync::{Arc, Mutex, MutexGuard};

/// A request waiting in a [`Gather`].
pub trait Waiter {
    /// Its asker went away: it is left out of the next batch.
    fn gone(&self) -> bool;
    /// The batches' task ended without reaching it (a panic, or a task dropped before it ran
    /// as a runtime shuts down): tells its asker so.
    fn stopped(self);
}

/// The requests waiting for the next batch, and whether a task takes them.
pub struct Gather<W> {
    state: Mutex<State<W>>,
}

struct State<W> {
    waiting: Vec<W>,
    running: bool,
}

impl<W> Default for Gather<W> {
    fn default() -> Self {
        Gather {
            state: Mutex::new(State {
                waiting: Vec::new(),
                running: false,
            }),
        }
    }
}

impl<W: Waiter> Gather<W> {
    fn lock(&self) -> MutexGuard<'_, State<W>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `w` to the next batch. When no task takes the batches, returns the guard of the
    /// one the caller must now spawn; made here, so a task dropped before it first runs
    /// still lets go of the batches.
    pub fn push(self: &Arc<Self>, w: W) -> Option<Running<W>> {
        let mut s = self.lock();
        s.waiting.push(w);
        (!std::mem::replace(&mut s.running, true)).then(|| Running {
            gather: self.clone(),
            finished: false,
        })
    }
}

/// The batches' task holds it: [`Running::next`] hands it each batch; dropped before nobody
/// waits, it tells whoever waits that the batches stopped, and the next push starts another.
pub struct Running<W: Waiter> {
    gather: Arc<Gather<W>>,
    finished: bool,
}

impl<W: Waiter> Running<W> {
    /// The next batch: up to `max` of those waiting, oldest first, those gone left out; `None`
    /// when nobody waits (the task ends; a push after this starts the next one).
    pub fn next(&mut self, max: usize) -> Option<Vec<W>> {
        let mut s = self.gather.lock();
        s.waiting.retain(|w| !w.gone());
        if s.waiting.is_empty() {
            s.running = false;
            self.finished = true;
            return None;
        }
        let n = s.waiting.len().min(max);
        Some(s.waiting.drain(..n).collect())
    }
}

impl<W: Waiter> Drop for Running<W> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let waiting = {
            let mut s = self.gather.lock();
            s.running = false;
            std::mem::take(&mut s.waiting)
        };
        for w in waiting {
            w.stopped();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct W {
        id: usize,
        gone: bool,
        stopped: Arc<AtomicUsize>,
    }

    impl Waiter for W {
        fn gone(&self) -> bool {
            self.gone
        }
        fn stopped(self) {
            self.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn w(id: usize, gone: bool, stopped: &Arc<AtomicUsize>) -> W {
        W {
            id,
            gone,
            stopped: stopped.clone(),
        }
    }

    #[test]
    fn batches_are_taken_in_turn_the_gone_left_out_and_one_task_at_a_time() {
        let stopped = Arc::new(AtomicUsize::new(0));
        let g = Arc::new(Gather::default());
        let mut running = g
            .push(w(0, false, &stopped))
            .expect("the first starts the task");
        for id in 1..5 {
            assert!(
                g.push(w(id, id == 2, &stopped)).is_none(),
                "one task at a time"
            );
        }
        let ids = |b: Vec<W>| b.into_iter().map(|w| w.id).collect::<Vec<_>>();
        assert_eq!(running.next(3).map(ids), Some(vec![0, 1, 3]));
        assert_eq!(running.next(3).map(ids), Some(vec![4]));
        assert!(running.next(3).is_none());
        drop(running);
        assert_eq!(
            stopped.load(Ordering::SeqCst),
            0,
            "it ended by finding nobody"
        );
        assert!(
            g.push(w(5, false, &stopped)).is_some(),
            "the next push starts a task"
        );
    }

    #[test]
    fn a_task_that_ends_otherwise_tells_whoever_waits_and_the_next_push_starts_another() {
        let stopped = Arc::new(AtomicUsize::new(0));
        let g = Arc::new(Gather::default());
        let running = g.push(w(0, false, &stopped)).unwrap();
        assert!(g.push(w(1, false, &stopped)).is_none());
        // (a panic, or a task dropped before its first poll)
        drop(running);
        assert_eq!(stopped.load(Ordering::SeqCst), 2);
        assert!(g.push(w(2, false, &stopped)).is_some());
    }
}
