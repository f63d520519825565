//! Making statement records durable from the worker threads themselves, and waiting
//! for them with as few thread switches as possible.
//!
//! Each worker thread runs a [`WakeHub`] task. Sessions queue their statement records
//! without waking the audit writer thread and ask the hub to commit; the hub's task
//! runs after the sessions that were ready in the same turn of the worker's loop, so
//! it commits all of them (and whatever other workers queued) with one fdatasync, on
//! this thread ([`Handle::commit_here`]). On the 2-core build machine a hand-off to
//! the writer thread and back cost two context switches and an inter-processor wake
//! per statement, more than the flush itself.
//!
//! A record another thread made durable completes its [`Slot`] there. Waking the
//! session directly from that thread makes tokio write the worker's eventfd once per
//! statement; the hub collects those sessions instead and is woken once for the
//! list, then wakes them locally, which costs no system call.
//!
//! Knows nothing about what the record says: only "done, with this result".

use crate::audit::writer::Handle;

use std::{
    cell::RefCell,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
};

/// What the writer said about the record: its sequence number, or why it failed.
pub type Outcome = Result<u64, String>;

thread_local! {
    static HUB: RefCell<Option<Arc<WakeHub>>> = const { RefCell::new(None) };
}

/// One worker thread's commits and wake-ups (see the module doc).
#[derive(Default)]
pub struct WakeHub {
    /// Sessions whose records another thread made durable.
    ready: Mutex<Vec<Waker>>,
    /// A wake of the hub's task is on its way: later completions only queue.
    armed: AtomicBool,
    notify: tokio::sync::Notify,
    /// Sessions of this thread queued records for the hub to commit.
    commit: tokio::sync::Notify,
    /// The audit writer the hub commits to (none: records go to the writer thread).
    audit: Option<Handle>,
}

impl WakeHub {
    /// Install a hub for the calling worker thread and return the task that serves it
    /// (spawn it on the worker's runtime).
    pub fn install(audit: Option<Handle>) -> impl Future<Output = ()> {
        let hub = Arc::new(Self { audit, ..Self::default() });
        HUB.with(|h| *h.borrow_mut() = Some(hub.clone()));
        async move {
            loop {
                tokio::select! {
                    biased;
                    _ = hub.commit.notified() => {
                        if let Some(a) = &hub.audit {
                            a.commit_here();
                        }
                    }
                    _ = hub.notify.notified() => {
                        // Disarm before taking the list: a completion after this point
                        // wakes the task again rather than being left behind.
                        hub.armed.store(false, Ordering::Release);
                        let ready = std::mem::take(&mut *hub.ready.lock().expect("invariant: lock not poisoned"));
                        for w in ready {
                            w.wake();
                        }
                    }
                }
            }
        }
    }

    /// The calling worker thread's hub, if it commits audit records.
    pub fn current() -> Option<Arc<Self>> {
        HUB.with(|h| h.borrow().clone()).filter(|h| h.audit.is_some())
    }

    /// Commit what this thread's sessions queued, once the sessions ready now ran.
    pub fn request_commit(&self) {
        self.commit.notify_one();
    }

    fn hand_over(&self, w: Waker) {
        self.ready.lock().expect("invariant: lock not poisoned").push(w);
        if !self.armed.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }
}

#[derive(Default)]
struct State {
    outcome: Option<Outcome>,
    waker: Option<Waker>,
}

/// One record's durability: completed once by the writer, awaited by its session.
#[derive(Clone)]
pub struct Slot {
    state: Arc<Mutex<State>>,
    hub: Option<Arc<WakeHub>>,
}

impl Slot {
    /// A slot whose waiter is woken through the calling thread's hub, if it has one.
    pub fn new() -> Self {
        Self { state: Arc::default(), hub: HUB.with(|h| h.borrow().clone()) }
    }

    /// What the writer completes the slot with. Dropped without an answer (the
    /// writer went away), it answers that the writer stopped: a waiting session is
    /// never left hanging.
    pub fn completer(&self) -> Completer {
        Completer(Some(self.clone()))
    }

    /// [`Slot::completer`] as the writer's callback.
    pub fn durable(&self) -> crate::audit::writer::Durable {
        let done = self.completer();
        Box::new(move |r| done.complete(r))
    }

    fn complete(&self, outcome: Outcome) {
        let waker = {
            let mut s = self.state.lock().expect("invariant: lock not poisoned");
            s.outcome = Some(outcome);
            s.waker.take()
        };
        if let Some(w) = waker {
            match &self.hub {
                Some(hub) => hub.hand_over(w),
                None => w.wake(),
            }
        }
    }

    /// The answer if it is there.
    pub fn try_take(&self) -> Option<Outcome> {
        self.state.lock().expect("invariant: lock not poisoned").outcome.take()
    }

    /// Wait for the answer.
    pub fn wait(self) -> Wait {
        Wait(self)
    }
}

impl Default for Slot {
    fn default() -> Self {
        Self::new()
    }
}

/// See [`Slot::completer`].
pub struct Completer(Option<Slot>);

impl Completer {
    pub fn complete(mut self, outcome: Outcome) {
        if let Some(s) = self.0.take() {
            s.complete(outcome);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.complete(Err("the audit writer stopped".into()));
        }
    }
}

/// See [`Slot::wait`].
pub struct Wait(Slot);

impl Future for Wait {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut s = self.0.state.lock().expect("invariant: lock not poisoned");
        match s.outcome.take() {
            Some(o) => Poll::Ready(o),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_from_another_thread_wake_waiters_through_the_hub() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("invariant: runtime builds");
        rt.block_on(async {
            tokio::spawn(WakeHub::install(None));
            let slots: Vec<Slot> = (0..5).map(|_| Slot::new()).collect();
            assert!(slots.iter().all(|s| s.hub.is_some()), "slots made on a hub's thread use it");
            assert!(slots[0].try_take().is_none());
            let waits: Vec<_> = slots.iter().cloned().map(|s| tokio::spawn(s.wait())).collect();
            tokio::task::yield_now().await;
            let done: Vec<Completer> = slots.iter().map(Slot::completer).collect();
            std::thread::spawn(move || {
                for (i, c) in done.into_iter().enumerate() {
                    match i {
                        3 => c.complete(Err("disk full".into())),
                        4 => drop(c),
                        _ => c.complete(Ok(i as u64)),
                    }
                }
            });
            for (i, w) in waits.into_iter().enumerate() {
                let got = tokio::time::timeout(std::time::Duration::from_secs(10), w).await.expect("woken").expect("task ran");
                let want = match i {
                    3 => Err("disk full".to_string()),
                    4 => Err("the audit writer stopped".to_string()),
                    _ => Ok(i as u64),
                };
                assert_eq!(got, want, "slot {i}");
            }
        });
    }

    #[test]
    fn without_a_hub_the_waiter_is_woken_directly() {
        let s = std::thread::spawn(Slot::new).join().expect("invariant: thread runs");
        assert!(s.hub.is_none());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("invariant: runtime builds");
        let done = s.completer();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            done.complete(Ok(7));
        });
        assert_eq!(rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), s.wait()).await }).expect("woken"), Ok(7));
    }
}
