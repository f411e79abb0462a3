//! [`Reader`]: a small pool of threads that read pages of stored messages for the event loops.
//!
//! An event loop never reads the disk: when a user logs in (or its drain needs the next page),
//! the shard [`submit_page`](Reader::submit_page)s a request and goes on with its loop; a reader
//! thread runs [`Store::pending`] (a read transaction beside the writer's, on redb's snapshot) and
//! hands the page to the request's `done` callback — which, like the group-commit writer's, only
//! posts it back to the core as mail.
//!
//! The queue is bounded: when it is full, `submit_page` answers [`StoreError::Busy`] at once and
//! the caller retries later (on a timer — never in a loop).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};

use super::{Store, StoreError, Stored};

/// Reader threads. Reads are short (one B-tree range of a page) and run beside the writer on a
/// snapshot; two keep a burst of logins from queueing behind one slow read, without taking
/// cores from the event loops.
pub const READER_THREADS: usize = 2;

/// Page requests queued at most. One per user whose drain is waiting for a page, so a mass
/// re-login after a restart (thousands of users at once) queues, and a queue this deep is
/// seconds of disk reads: beyond it the shard retries on a timer rather than holding more.
pub const READ_QUEUE_CAPACITY: usize = 4_096;

/// The threads' name (visible in `top -H`, panics and profiles).
const THREAD_NAME: &str = "imedge-read";

/// Gets a page (or the error that prevented it), on a reader thread.
pub type PageDone = Box<dyn FnOnce(Result<Vec<Stored>, StoreError>) + Send + 'static>;

/// One queued request.
struct PageRequest {
    to: String,
    after: u64,
    limit: usize,
    now_ms: i64,
    done: PageDone,
}

/// What the readers have done since they started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Pages read (successfully or not).
    pub pages: u64,
    /// Reads that failed (their callbacks got the error).
    pub failed: u64,
    /// Requests refused with [`StoreError::Busy`] (queue full).
    pub busy: u64,
}

#[derive(Debug, Default)]
struct Counters {
    pages: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
}

/// The read side of a [`Store`] for the event loops: a bounded queue and [`READER_THREADS`]
/// threads. Dropping it lets the threads finish what is queued, and joins them.
pub struct Reader {
    /// `None` only while stopping (dropping the sender is what stops the threads).
    queue: Option<Sender<PageRequest>>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("threads", &self.threads.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Starts [`READER_THREADS`] threads with a queue of [`READ_QUEUE_CAPACITY`].
    pub fn start(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        Self::start_with(store, READER_THREADS, READ_QUEUE_CAPACITY)
    }

    /// Starts `threads` threads (at least one) with a queue of `capacity`.
    pub fn start_with(
        store: Arc<dyn Store>,
        threads: usize,
        capacity: usize,
    ) -> Result<Self, StoreError> {
        let (queue, requests) = crossbeam_channel::bounded::<PageRequest>(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (store, requests, counters) =
                (Arc::clone(&store), requests.clone(), Arc::clone(&counters));
            let handle = std::thread::Builder::new()
                .name(format!("{THREAD_NAME}-{i}"))
                .spawn(move || {
                    while let Ok(r) = requests.recv() {
                        let page = catch_unwind(AssertUnwindSafe(|| {
                            store.pending(&r.to, r.after, r.limit, r.now_ms)
                        }))
                        .unwrap_or_else(|_| {
                            Err(StoreError::backend(std::io::Error::other(
                                "offline store panicked while reading",
                            )))
                        });
                        counters.pages.fetch_add(1, Ordering::Relaxed);
                        if page.is_err() {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        let done = r.done;
                        if catch_unwind(AssertUnwindSafe(|| done(page))).is_err() {
                            tracing::error!("offline read callback panicked");
                        }
                    }
                })
                .map_err(StoreError::backend)?;
            handles.push(handle);
        }
        Ok(Self {
            queue: Some(queue),
            threads: handles,
            counters,
        })
    }

    /// Queues a read of up to `limit` messages of `to` after seq `after` (see
    /// [`Store::pending`]); `done` gets the page on a reader thread. Never blocks: a full queue
    /// is [`StoreError::Busy`] (and a stopped reader [`StoreError::Closed`]) at once, and `done`
    /// is dropped uncalled — retry later.
    pub fn submit_page(
        &self,
        to: &str,
        after: u64,
        limit: usize,
        now_ms: i64,
        done: PageDone,
    ) -> Result<(), StoreError> {
        let Some(queue) = &self.queue else {
            return Err(StoreError::Closed);
        };
        let request = PageRequest {
            to: to.to_owned(),
            after,
            limit,
            now_ms,
            done,
        };
        match queue.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::Busy)
            }
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            pages: self.counters.pages.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            busy: self.counters.busy.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.queue = None;
        let me = std::thread::current().id();
        for handle in self.threads.drain(..) {
            // Dropped by one of its own callbacks: that thread exits by itself.
            if handle.thread().id() == me {
                continue;
            }
            if handle.join().is_err() {
                tracing::error!("offline reader thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::redb::RedbStore;
    use crate::store::testutil::{msg, n_of, TempDir};
    use crate::store::Limits;

    #[test]
    fn pages_come_back_through_the_callback_and_a_full_queue_is_busy() {
        let dir = TempDir::new("reader");
        let store = Arc::new(RedbStore::open(dir.path(), Limits::default()).unwrap());
        let batch: Vec<_> = (0..10).map(|n| msg("u", "s", n, 0)).collect();
        store.append(&batch).unwrap();
        let reader = Reader::start(store.clone()).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let done =
            move |tx: Sender<_>| -> PageDone { Box::new(move |page| tx.send(page).unwrap()) };
        reader.submit_page("u", 0, 4, 0, done(tx.clone())).unwrap();
        let page = rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!(
            page.iter().map(|s| n_of(&s.json)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        reader
            .submit_page("u", page[3].seq, 100, 0, done(tx.clone()))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30))
                .unwrap()
                .unwrap()
                .len(),
            6
        );
        assert_eq!(reader.stats().pages, 2);
        drop(reader);

        // A queue of one whose single thread is held in a callback: the third request is busy.
        let reader = Reader::start_with(store, 1, 1).unwrap();
        let (entered, in_callback) = crossbeam_channel::bounded(1);
        let (release, released) = crossbeam_channel::bounded::<()>(1);
        reader
            .submit_page(
                "u",
                0,
                1,
                0,
                Box::new(move |_| {
                    entered.send(()).unwrap();
                    released.recv_timeout(Duration::from_secs(30)).unwrap();
                }),
            )
            .unwrap();
        in_callback.recv_timeout(Duration::from_secs(30)).unwrap();
        reader.submit_page("u", 0, 1, 0, done(tx.clone())).unwrap();
        let busy = reader.submit_page("u", 0, 1, 0, done(tx.clone()));
        assert!(matches!(busy, Err(StoreError::Busy)), "{busy:?}");
        assert_eq!(reader.stats().busy, 1);
        release.send(()).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30))
                .unwrap()
                .unwrap()
                .len(),
            1
        );
    }
}
