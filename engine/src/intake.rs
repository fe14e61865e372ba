//! Webhook deliveries committed together. Each delivery is one transaction's worth of work
//! (log the event, start its run), small next to the commit itself; so deliveries that arrive
//! while one batch commits wait, and go in the next batch, as one transaction
//! (`Store::receive_webhooks`): many callers share one commit. What waits is bounded in bytes
//! ([`WAITING_BYTES`]): past it, a delivery is refused at once (503) rather than queued.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::clock::Clock;
use crate::store::{NewWebhookEvent, Result, Store, StoreError, WebhookAction, WebhookOutcome};

/// The most deliveries in one transaction.
const BATCH: usize = 256;
/// The most bytes of payload in one transaction.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// The most bytes of payload waiting or being committed, in KiB (the semaphore's unit).
pub(crate) const WAITING_BYTES: usize = 64 * 1024 * 1024;

type Reply = oneshot::Sender<Result<WebhookOutcome>>;

struct Pending {
    event: NewWebhookEvent,
    action: WebhookAction,
    reply: Reply,
    bytes: usize,
    /// Its share of [`WAITING_BYTES`], given back once it is committed.
    _room: OwnedSemaphorePermit,
}

/// The queue of deliveries to commit, and the task that commits them.
pub(crate) struct Intake {
    queue: mpsc::UnboundedSender<Pending>,
    room: Arc<Semaphore>,
}

impl Intake {
    /// Starts the committing task on the current runtime.
    pub(crate) fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Intake {
        let (queue, mut pending) = mpsc::unbounded_channel::<Pending>();
        tokio::spawn(async move {
            while let Some(first) = pending.recv().await {
                let mut bytes = first.bytes;
                let mut batch = vec![first];
                while batch.len() < BATCH && bytes < BATCH_BYTES {
                    match pending.try_recv() {
                        Ok(more) => {
                            bytes += more.bytes;
                            batch.push(more);
                        }
                        Err(_) => break,
                    }
                }
                commit(&*store, clock.now(), batch).await;
            }
        });
        Intake {
            queue,
            room: Arc::new(Semaphore::new(WAITING_BYTES / 1024)),
        }
    }

    /// Logs `event` and does `action`, with whatever else is waiting.
    pub(crate) async fn receive(
        &self,
        event: NewWebhookEvent,
        action: WebhookAction,
    ) -> Result<WebhookOutcome> {
        let bytes = serde_json::to_vec(&event.payload).map_or(0, |b| b.len());
        let kib = u32::try_from(bytes / 1024 + 1).unwrap_or(u32::MAX);
        let room = self.room.clone().try_acquire_many_owned(kib).map_err(|_| {
            StoreError::Unavailable(
                "too many webhook deliveries are waiting to be stored; retry in a second".into(),
            )
        })?;
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                event,
                action,
                reply,
                bytes,
                _room: room,
            })
            .map_err(|_| StoreError::Unavailable("the webhook intake has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the webhook intake has stopped".into()))?
    }
}

/// Commits `batch` as one transaction. If that fails, each delivery is tried alone, so that
/// one that cannot be stored fails no other.
async fn commit(store: &dyn Store, now: i64, batch: Vec<Pending>) {
    if batch.len() > 1 {
        let deliveries = batch
            .iter()
            .map(|p| (p.event.clone(), p.action.clone()))
            .collect();
        match store.receive_webhooks(deliveries, now).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending.reply.send(Ok(outcome));
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, deliveries = batch.len(),
                "a batch of webhook deliveries failed; storing each alone"),
        }
    }
    for pending in batch {
        let outcome = store
            .receive_webhook(pending.event, pending.action, now)
            .await;
        let _ = pending.reply.send(outcome);
    }
}
