//! The one shape of the services' compute threads (decode engine, prefill engine, expert
//! compute): an OS thread owns the state and takes commands from a bounded mailbox, and
//! publishes its load on a `watch` after every step.
//!
//! Each actor keeps its command enum private and wraps [`Handle`] in a handle with typed
//! methods; [`spawn`] returns that handle's core and the [`Thread`] to watch and join.
//! Ingress (a gRPC handler) sends with [`Handle::try_call`]: a full mailbox is
//! [`ActorError::Busy`] at once (RESOURCE_EXHAUSTED at the edge), never a wait. Internal
//! control that must not be refused (placement changes) waits with [`Handle::call`]. Load
//! is read from the watch ([`Handle::load`]), never queued behind work.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};

/// Why a command did not reach its actor, or got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActorError {
    #[error("the {actor} is busy: its mailbox of {capacity} commands is full")]
    Busy { actor: &'static str, capacity: usize },
    #[error("the {actor} has stopped")]
    Stopped { actor: &'static str },
}

impl From<ActorError> for tonic::Status {
    fn from(e: ActorError) -> Self {
        match e {
            ActorError::Busy { .. } => tonic::Status::resource_exhausted(e.to_string()),
            ActorError::Stopped { .. } => tonic::Status::unavailable(e.to_string()),
        }
    }
}

/// The thread ended by panicking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {actor} thread panicked: {message}")]
pub struct ThreadPanicked {
    pub actor: &'static str,
    pub message: String,
}

/// The cloneable sending side of an actor and its published load. The thread ends once
/// every clone is dropped or [`Handle::close`] is called, after the commands already queued.
pub struct Handle<C, L> {
    mailbox: Arc<Mailbox<C>>,
    load: watch::Receiver<L>,
}

struct Mailbox<C> {
    actor: &'static str,
    capacity: usize,
    /// `None` once closed.
    tx: Mutex<Option<mpsc::Sender<C>>>,
}

impl<C, L> Clone for Handle<C, L> {
    fn clone(&self) -> Self {
        Handle { mailbox: self.mailbox.clone(), load: self.load.clone() }
    }
}

impl<C, L> fmt::Debug for Handle<C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle").field("actor", &self.mailbox.actor).field("capacity", &self.mailbox.capacity).finish()
    }
}

impl<C, L> Handle<C, L> {
    fn busy(&self) -> ActorError {
        ActorError::Busy { actor: self.mailbox.actor, capacity: self.mailbox.capacity }
    }

    fn stopped(&self) -> ActorError {
        ActorError::Stopped { actor: self.mailbox.actor }
    }

    fn sender(&self) -> Result<mpsc::Sender<C>, ActorError> {
        self.mailbox.tx.lock().unwrap_or_else(PoisonError::into_inner).clone().ok_or_else(|| self.stopped())
    }

    /// Queues `command`, or refuses at once when the mailbox is full or closed.
    pub fn try_send(&self, command: C) -> Result<(), ActorError> {
        let tx = self.mailbox.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = tx.as_ref().ok_or_else(|| self.stopped())?;
        tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => self.busy(),
            mpsc::error::TrySendError::Closed(_) => self.stopped(),
        })
    }

    /// Queues `command`, waiting while the mailbox is full.
    pub async fn send(&self, command: C) -> Result<(), ActorError> {
        self.sender()?.send(command).await.map_err(|_| self.stopped())
    }

    /// Ingress: queues the command `make` builds around a reply channel (refused at once
    /// when the mailbox is full) and waits for the reply.
    pub async fn try_call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> C) -> Result<T, ActorError> {
        let (reply, answer) = oneshot::channel();
        self.try_send(make(reply))?;
        answer.await.map_err(|_| self.stopped())
    }

    /// Internal control: like [`Handle::try_call`], but waits while the mailbox is full.
    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> C) -> Result<T, ActorError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply)).await?;
        answer.await.map_err(|_| self.stopped())
    }

    /// Refuses every further command (every clone); the thread ends after the queued ones.
    pub fn close(&self) {
        self.mailbox.tx.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    /// The load the thread last published.
    pub fn load(&self) -> L
    where
        L: Clone,
    {
        self.load.borrow().clone()
    }

    /// Follows the published load (e.g. to wait until it is idle); it reports the sender
    /// gone once the thread has ended.
    pub fn loads(&self) -> watch::Receiver<L> {
        self.load.clone()
    }
}

/// The actor's thread: watched for death, joined at shutdown.
#[derive(Debug)]
pub struct Thread {
    actor: &'static str,
    join: std::thread::JoinHandle<()>,
    /// `None` once the thread was seen to finish.
    done: Option<oneshot::Receiver<()>>,
}

impl Thread {
    /// The actor's name (as in its errors).
    pub fn actor(&self) -> &'static str {
        self.actor
    }

    /// Resolves once the thread has ended, however it ended (returned or panicked).
    /// Cancel-safe: use it in `select!` to notice a thread that died.
    pub async fn finished(&mut self) {
        // The sender lives on the thread's stack: it is dropped when the thread ends or unwinds.
        if let Some(done) = &mut self.done {
            let _ = done.await;
            self.done = None;
        }
    }

    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Joins the thread, blocking until it has ended: call after [`Thread::finished`] (or
    /// off the runtime). A panic comes back as its message.
    pub fn join(self) -> Result<(), ThreadPanicked> {
        let actor = self.actor;
        self.join.join().map_err(|panic| ThreadPanicked { actor, message: panic_message(panic.as_ref()) })
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Starts an actor named `actor` (its thread is named after it) with a mailbox of
/// `capacity` commands and `load` published. `body` runs on the thread with the mailbox's
/// receiving end and the load's sender; the mailbox reports closed once every handle is
/// dropped or closed and the queued commands are taken.
pub fn spawn<C, L, F>(actor: &'static str, capacity: usize, load: L, body: F) -> std::io::Result<(Handle<C, L>, Thread)>
where
    C: Send + 'static,
    L: Send + Sync + 'static,
    F: FnOnce(mpsc::Receiver<C>, watch::Sender<L>) + Send + 'static,
{
    let capacity = capacity.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let (load_tx, load_rx) = watch::channel(load);
    let (done_tx, done) = oneshot::channel::<()>();
    let join = std::thread::Builder::new().name(actor.replace(' ', "-")).spawn(move || {
        let _done = done_tx;
        body(rx, load_tx);
    })?;
    let handle = Handle { mailbox: Arc::new(Mailbox { actor, capacity, tx: Mutex::new(Some(tx)) }), load: load_rx };
    Ok((handle, Thread { actor, join, done: Some(done) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Cmd {
        Add(u64, oneshot::Sender<u64>),
        Block(std::sync::mpsc::Receiver<()>),
        Panic,
    }

    /// Adds to a sum, publishing it as its load after every command.
    fn adder() -> (Handle<Cmd, u64>, Thread) {
        spawn("test adder", 2, 0u64, |mut rx, load| {
            let mut sum = 0;
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Cmd::Add(n, reply) => {
                        sum += n;
                        let _ = reply.send(sum);
                    }
                    Cmd::Block(until) => {
                        let _ = until.recv();
                    }
                    Cmd::Panic => panic!("asked to panic"),
                }
                load.send_replace(sum);
            }
        })
        .expect("spawn")
    }

    #[tokio::test]
    async fn calls_answer_and_load_is_published() {
        let (handle, mut thread) = adder();
        assert_eq!(handle.try_call(|r| Cmd::Add(2, r)).await, Ok(2));
        assert_eq!(handle.call(|r| Cmd::Add(3, r)).await, Ok(5));
        let mut loads = handle.loads();
        loads.wait_for(|&l| l == 5).await.expect("published");
        assert_eq!(handle.load(), 5);
        drop(handle);
        thread.finished().await;
        assert_eq!(thread.join(), Ok(()));
        assert!(loads.changed().await.is_err(), "the load's sender is gone with the thread");
    }

    #[tokio::test]
    async fn a_full_mailbox_is_busy_at_once_and_close_refuses() {
        let (handle, mut thread) = adder();
        let (unblock, blocked) = std::sync::mpsc::channel();
        handle.try_send(Cmd::Block(blocked)).expect("queued");
        // The thread may or may not have taken the blocking command yet: fill what is left.
        let mut queued = Vec::new();
        let busy = loop {
            let (reply, answer) = oneshot::channel();
            match handle.try_send(Cmd::Add(1, reply)) {
                Ok(()) => queued.push(answer),
                Err(e) => break e,
            }
            assert!(queued.len() <= 3, "a mailbox of 2 took {} commands", queued.len());
        };
        assert_eq!(busy, ActorError::Busy { actor: "test adder", capacity: 2 });
        assert_eq!(busy.to_string(), "the test adder is busy: its mailbox of 2 commands is full");
        assert_eq!(tonic::Status::from(busy).code(), tonic::Code::ResourceExhausted);
        handle.clone().close();
        let closed = handle.try_send(Cmd::Panic).expect_err("closed");
        assert_eq!(closed, ActorError::Stopped { actor: "test adder" });
        assert_eq!(tonic::Status::from(closed).code(), tonic::Code::Unavailable);
        unblock.send(()).expect("the thread waits");
        // Queued commands still run after the close.
        for answer in queued {
            answer.await.expect("answered");
        }
        thread.finished().await;
        assert_eq!(thread.join(), Ok(()));
    }

    #[tokio::test]
    async fn a_panicking_thread_is_seen_finished_with_its_message() {
        let (handle, mut thread) = adder();
        handle.try_send(Cmd::Panic).expect("queued");
        thread.finished().await;
        let stopped = handle.try_call(|r| Cmd::Add(1, r)).await.expect_err("the thread is gone");
        assert_eq!(stopped, ActorError::Stopped { actor: "test adder" });
        let panicked = thread.join().expect_err("it panicked");
        assert_eq!(panicked.message, "asked to panic");
        assert_eq!(panicked.to_string(), "the test adder thread panicked: asked to panic");
    }
}
