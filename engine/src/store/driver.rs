//! The seam between the engine and a database, in River's shape: a [`Driver`] opens transactions
//! made of the machine's primitives ([`Tx`]), claims jobs and answers [`Reads`]. Every operation
//! that writes is written here once, over those, as the one implementation of [`Store`]; a
//! driver holds SQL and no rule.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Notify;

use super::machine::{self, Effects, RecordCutoffs, SettingKey, Tx};
use super::{
    AUDIT_KEPT_MS, CallbackAnswer, ClaimParams, ClaimedJob, Completion, FireOutcome, FireParams,
    GapFill, HeldNotifications, InstallParams, JobId, Lease, LogLine, NewAuditEntry, NewRun,
    NewWebhookEvent, NonceAllocation, NonceGap, NonceRequest, Notification, RECORDS_KEPT_MS, Reads,
    Result, RunId, SettingChange, Signal, SignalOutcome, SkippedFire, Store, StoreError, Swept,
    TokenRevocation, WebhookAction, WebhookOutcome,
};
use crate::state::{Millis, RunStatus};

/// What a database gives the engine.
#[async_trait]
pub(crate) trait Driver: Reads {
    /// A write transaction: rolled back when dropped, unless [`Driver::commit`] took it.
    type Tx: Tx + 'static;
    /// Jobs a claim leased inside a transaction, read out by [`Driver::claimed`] after it
    /// commits.
    type Leased: Default + Send;

    async fn apply_migrations(&self) -> Result<()>;
    /// Signalled when jobs became claimable (in this process, or in any, where the database
    /// tells every process).
    fn wakeups(&self) -> Arc<Notify>;

    async fn begin(&self) -> Result<Self::Tx>;
    /// Commits `tx`, then acts on what it did: wakes the workers where it made jobs claimable
    /// that its own claim (`claimed`) did not take, and publishes the rest of `effects`.
    async fn commit(&self, tx: Self::Tx, effects: Effects, claimed: &[JobId]) -> Result<()>;

    /// A claim on its own: in one statement where the database allows it.
    async fn claim_jobs(&self, params: &ClaimParams) -> Result<Vec<ClaimedJob>>;
    /// Leases jobs inside `tx`, as [`Driver::claim_jobs`] does.
    async fn lease(&self, tx: &mut Self::Tx, params: &ClaimParams) -> Result<Self::Leased>;
    fn leased_ids(leased: &Self::Leased) -> Vec<JobId>;
    /// The leased jobs with what their steps need to run.
    async fn claimed(&self, leased: Self::Leased) -> Result<Vec<ClaimedJob>>;
    /// Extends the leases still held (see [`Store::heartbeat`]).
    async fn extend_leases(&self, leases: &[Lease], lease_until: Millis) -> Result<Vec<JobId>>;
}

/// Runs `$op(tx, …, &mut effects)` of the machine in a transaction of its own and commits it.
macro_rules! transition {
    ($driver:expr, $op:path, $($arg:expr),*) => {{
        let mut tx = $driver.begin().await?;
        let mut effects = Effects::default();
        let outcome = $op(&mut tx, $($arg,)* &mut effects).await?;
        $driver.commit(tx, effects, &[]).await?;
        Ok(outcome)
    }};
}

#[async_trait]
impl<D: Driver> Store for D {
    async fn migrate(&self) -> Result<()> {
        self.apply_migrations().await
    }

    fn wakeup(&self) -> Arc<Notify> {
        self.wakeups()
    }

    async fn upsert_workflows(&self, install: InstallParams<'_>, now: Millis) -> Result<Vec<i64>> {
        let mut tx = self.begin().await?;
        let versions = machine::upsert_workflows(&mut tx, install, now).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(versions)
    }

    async fn remove_workflow(&self, id: &str, force: bool) -> Result<()> {
        let mut tx = self.begin().await?;
        machine::remove_workflow(&mut tx, id, force).await?;
        self.commit(tx, Effects::default(), &[]).await
    }

    async fn set_paused(&self, id: &str, paused: bool, now: Millis) -> Result<()> {
        let mut tx = self.begin().await?;
        if !tx.set_paused(id, paused, now).await? {
            return Err(StoreError::NotFound(format!("workflow {id}")));
        }
        self.commit(tx, Effects::default(), &[]).await
    }

    async fn create_runs(&self, runs: Vec<NewRun>, now: Millis) -> Result<Vec<RunId>> {
        let mut tx = self.begin().await?;
        let ids = machine::insert_runs(&mut tx, runs, now).await?;
        let mut effects = Effects::default();
        effects.woke();
        self.commit(tx, effects, &[]).await?;
        Ok(ids)
    }

    async fn fire(&self, fire: FireParams, now: Millis) -> Result<FireOutcome> {
        transition!(self, machine::fire, fire, now)
    }

    async fn skip_fire(&self, fire: SkippedFire<'_>, now: Millis) -> Result<bool> {
        transition!(self, machine::skip_fire, fire, now)
    }

    async fn claim(&self, params: ClaimParams) -> Result<Vec<ClaimedJob>> {
        self.claim_jobs(&params).await
    }

    async fn heartbeat(&self, leases: &[Lease], lease_until: Millis) -> Result<Vec<JobId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        self.extend_leases(leases, lease_until).await
    }

    async fn hold_notifications(
        &self,
        now: Millis,
        hold_ms: Millis,
        limit: u32,
    ) -> Result<HeldNotifications> {
        let token = format!("{:032x}", rand::random::<u128>());
        let until = now + hold_ms;
        let mut tx = self.begin().await?;
        let notifications = tx.hold_notifications(now, until, &token, limit).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(HeldNotifications {
            token,
            until,
            notifications,
        })
    }

    async fn settle_notification(
        &self,
        held: &Notification,
        token: &str,
        result: std::result::Result<(), String>,
        now: Millis,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let still = machine::settle_notification(&mut tx, held, token, result, now).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(still)
    }

    async fn take_quota(
        &self,
        name: &str,
        limit: u32,
        per: std::time::Duration,
        now: Millis,
    ) -> Result<Millis> {
        let mut tx = self.begin().await?;
        let at = machine::take_quota(&mut tx, name, limit, per, now).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(at)
    }

    async fn append_live_logs(&self, lease: &Lease, lines: &[LogLine]) -> Result<bool> {
        let mut tx = self.begin().await?;
        let held = machine::append_live_logs(&mut tx, lease, lines).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(held)
    }

    async fn complete_and_claim(
        &self,
        completions: Vec<Completion>,
        claim: ClaimParams,
        now: Millis,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>)> {
        let mut tx = self.begin().await?;
        let mut effects = Effects::default();
        let accepted = machine::complete(&mut tx, completions, now, &mut effects).await?;
        let leased = if claim.limit == 0 {
            D::Leased::default()
        } else {
            self.lease(&mut tx, &claim).await?
        };
        self.commit(tx, effects, &D::leased_ids(&leased)).await?;
        Ok((accepted, self.claimed(leased).await?))
    }

    async fn deliver_callback(&self, answer: &CallbackAnswer, now: Millis) -> Result<bool> {
        transition!(self, machine::deliver_callback, answer, now)
    }

    async fn deliver_signal(&self, signal: &Signal, now: Millis) -> Result<SignalOutcome> {
        transition!(self, machine::deliver_signal, signal, now)
    }

    async fn sweep(&self, now: Millis) -> Result<Swept> {
        transition!(self, machine::sweep, now)
    }

    async fn cancel_run(&self, run_id: &str, now: Millis) -> Result<RunStatus> {
        transition!(self, machine::cancel_run, run_id, now)
    }

    async fn retry_run(&self, run_id: &str, now: Millis) -> Result<()> {
        transition!(self, machine::retry_run, run_id, now)
    }

    async fn prune(&self, now: Millis, limit: u32) -> Result<u64> {
        let mut tx = self.begin().await?;
        tx.delete_old_records(&RecordCutoffs {
            records_before: now - RECORDS_KEPT_MS,
            audit_before: now - AUDIT_KEPT_MS,
            revocations_before: now,
        })
        .await?;
        let runs = tx.expired_runs(now, limit).await?;
        let deleted = if runs.is_empty() {
            0
        } else {
            tx.delete_runs(&runs).await?
        };
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(deleted)
    }

    async fn put_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        tx.put_setting(SettingKey { namespace, name }, value, now)
            .await?;
        self.commit(tx, Effects::default(), &[]).await
    }

    async fn init_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<Value> {
        let mut tx = self.begin().await?;
        let stored = tx
            .init_setting(SettingKey { namespace, name }, value, now)
            .await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(stored)
    }

    async fn delete_setting(&self, namespace: &str, name: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let existed = tx.delete_setting(SettingKey { namespace, name }).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(existed)
    }

    async fn receive_webhooks(
        &self,
        deliveries: Vec<(NewWebhookEvent, WebhookAction)>,
        now: Millis,
    ) -> Result<Vec<WebhookOutcome>> {
        transition!(self, machine::receive_webhooks, deliveries, now)
    }

    async fn probe_write(&self, now: Millis) -> Result<()> {
        let mut tx = self.begin().await?;
        tx.probe_write(now).await?;
        self.commit(tx, Effects::default(), &[]).await
    }

    async fn change_settings(
        &self,
        changes: Vec<SettingChange>,
        audit: Option<NewAuditEntry>,
        now: Millis,
    ) -> Result<Vec<bool>> {
        let mut tx = self.begin().await?;
        let mut applied = Vec::with_capacity(changes.len());
        for change in &changes {
            applied.push(match change {
                SettingChange::Put {
                    namespace,
                    name,
                    value,
                } => {
                    tx.put_setting(SettingKey { namespace, name }, value, now)
                        .await?;
                    true
                }
                SettingChange::Delete { namespace, name } => {
                    tx.delete_setting(SettingKey { namespace, name }).await?
                }
                SettingChange::Swap {
                    namespace,
                    name,
                    old,
                    new,
                } => {
                    tx.swap_setting(SettingKey { namespace, name }, old, new)
                        .await?
                }
            });
        }
        if let Some(entry) = audit
            && applied.iter().any(|a| *a)
        {
            tx.record_audit(&entry, now).await?;
        }
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(applied)
    }

    async fn record_audit(&self, entry: NewAuditEntry, now: Millis) -> Result<()> {
        let mut tx = self.begin().await?;
        tx.record_audit(&entry, now).await?;
        self.commit(tx, Effects::default(), &[]).await
    }

    async fn revoke_token(
        &self,
        revocation: TokenRevocation,
        audit: NewAuditEntry,
        now: Millis,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let revoked = tx.revoke_token(&revocation, now).await?;
        if revoked {
            tx.record_audit(&audit, now).await?;
        }
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(revoked)
    }

    async fn allocate_nonce(&self, request: &NonceRequest, now: Millis) -> Result<NonceAllocation> {
        let mut tx = self.begin().await?;
        let allocation = machine::allocate_nonce(&mut tx, request, now).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(allocation)
    }

    async fn fill_nonce_gap(&self, gap: &NonceGap, now: Millis) -> Result<GapFill> {
        let mut tx = self.begin().await?;
        let fill = machine::fill_nonce_gap(&mut tx, gap, now).await?;
        self.commit(tx, Effects::default(), &[]).await?;
        Ok(fill)
    }

    async fn note_nonce_fill(&self, gap: &NonceGap, hash: &str) -> Result<()> {
        let mut tx = self.begin().await?;
        machine::note_nonce_fill(&mut tx, gap, hash).await?;
        self.commit(tx, Effects::default(), &[]).await
    }
}
