//! Webhook deliveries committed together. Each delivery is one transaction's worth of work
//! (log the event, start its run), small next to the commit itself; so deliveries that arrive
//! while one batch commits wait, and go in the next batch, as one transaction
//! (`Store::receive_webhooks`). A caller waits no longer than its own commit would take when
//! it is alone, and many callers share one commit when they are not.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::store::{NewWebhookEvent, Result, Store, StoreError, WebhookAction, WebhookOutcome};

/// The most deliveries in one transaction.
const BATCH: usize = 256;

type Reply = oneshot::Sender<Result<WebhookOutcome>>;

struct Pending {
    event: NewWebhookEvent,
    action: WebhookAction,
    reply: Reply,
}

/// The queue of deliveries to commit, and the task that commits them.
pub(crate) struct Intake {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Intake {
    /// Starts the committing task on the current runtime.
    pub(crate) fn start(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Intake {
        let (queue, mut pending) = mpsc::unbounded_channel::<Pending>();
        tokio::spawn(async move {
            while let Some(first) = pending.recv().await {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match pending.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                commit(&*store, clock.now(), batch).await;
            }
        });
        Intake { queue }
    }

    /// Logs `event` and does `action`, with whatever else is waiting.
    pub(crate) async fn receive(
        &self,
        event: NewWebhookEvent,
        action: WebhookAction,
    ) -> Result<WebhookOutcome> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                event,
                action,
                reply,
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
        if let Ok(outcomes) = store.receive_webhooks(deliveries, now).await {
            for (pending, outcome) in batch.into_iter().zip(outcomes) {
                let _ = pending.reply.send(Ok(outcome));
            }
            return;
        }
    }
    for pending in batch {
        let outcome = store
            .receive_webhook(pending.event, pending.action, now)
            .await;
        let _ = pending.reply.send(outcome);
    }
}
