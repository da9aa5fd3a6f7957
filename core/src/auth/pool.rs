//! The threads that check passwords: a fixed few, started with the first login.
//!
//! argon2id takes tens of milliseconds of a core and 19 MiB of memory per check. Run on tokio's
//! blocking pool, each check could land on a new thread, and glibc gives every thread its own
//! arena that keeps what it once held: 40 bad logins took a broker from 8 MB to 670 MB of RSS,
//! never given back (issue 13). Here [`MAX_CONCURRENT_VERIFICATIONS`] threads, made once, take
//! checks from one queue, and each argon2 check's working memory is mapped for that check and
//! unmapped after it (see [`argon2_blocks`]), so RSS returns to where it was once the logins
//! are done.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{dummy_hash, PasswordHash};

/// One check: the hash (`None`: the dummy hash, for an unknown user) and the password; the
/// answer goes to `reply`, and `after` runs with the outcome once it is known.
pub(super) struct Job {
    pub hash: Option<Arc<PasswordHash>>,
    pub password: Vec<u8>,
    pub reply: oneshot::Sender<bool>,
    /// Runs with `Some(matched)` after the check, or `None` when the check was skipped
    /// because nobody waits for it any more.
    pub after: Box<dyn FnOnce(Option<bool>) + Send>,
}

/// The queue to the checking threads.
pub(super) struct Pool {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts `workers` threads; they end when the pool is dropped.
    pub fn start(workers: usize) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("ferry-auth-{i}"))
                .spawn(move || work(&rx))
                .expect("a password-check thread can be started");
        }
        Pool { jobs: tx }
    }

    /// Queues a check. The caller bounds how many are queued.
    pub fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            // Only when every thread has died, which a check cannot make happen: answer no.
            (job.after)(None);
        }
    }
}

fn work(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        // The client went away while its check waited: nobody would see the answer.
        if job.reply.is_closed() {
            (job.after)(None);
            continue;
        }
        let matched = match &job.hash {
            Some(hash) => hash.verify(&job.password),
            None => {
                dummy_hash().verify(&job.password);
                false
            }
        };
        (job.after)(Some(matched));
        let _ = job.reply.send(matched);
    }
}

/// Working memory for one argon2 check of `blocks` 1 KiB blocks, given back to the operating
/// system when dropped.
///
/// glibc serves an allocation from an arena, where a freed 19 MiB stays resident, unless it
/// maps it on its own; it maps every allocation over its mapping threshold, which it raises as
/// mapped chunks are freed but never past 32 MiB (`DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit,
/// mallopt(3)). So the capacity asked for is over 32 MiB whatever `blocks` is: the allocation
/// is mapped, only the blocks used are touched (resident), and dropping it unmaps all of it.
/// Mapping and faulting 19 MiB in costs about a millisecond, against tens for the check.
pub(super) fn argon2_blocks(blocks: usize) -> Vec<argon2::Block> {
    const OVER_MMAP_MAX: usize = (32 << 20) / argon2::Block::SIZE + 1;
    let mut v = Vec::with_capacity(blocks.max(OVER_MMAP_MAX));
    v.resize(blocks, argon2::Block::default());
    v
}
