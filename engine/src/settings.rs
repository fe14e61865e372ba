//! Template variables and secrets that operators set at runtime (over the API), stored in the
//! `vars` and `secrets` settings namespaces, secrets encrypted under the master key
//! (`crate::keys`). Workers read them through a per-process cache, refreshed at most once a second
//! and dropped as soon as this process changes a setting: a change made through another process
//! reaches new steps here within a second. Every change is written with its audit log entry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::keys::MasterKeys;
use crate::service::Engine;
use crate::state::Millis;
use crate::store::{NewAuditEntry, Setting, SettingChange, StoreError};

pub const VARS: &str = "vars";
pub const SECRETS: &str = "secrets";
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The stored variables and secrets, by name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TemplateValues {
    pub vars: serde_json::Map<String, Value>,
    pub secrets: BTreeMap<String, String>,
}

/// Every step reads it, so the fresh case takes only a shared lock; a refresh is serialised
/// separately, so one caller queries while the others wait for its answer.
#[derive(Default)]
pub(crate) struct SettingsCache {
    current: std::sync::RwLock<Option<(Instant, Arc<TemplateValues>)>>,
    refresh: tokio::sync::Mutex<()>,
    /// What secrets are encrypted with; given once, when the process opens its database.
    keys: std::sync::OnceLock<MasterKeys>,
}

/// Gives the engine the master keys its secrets are encrypted under. Once per engine; a second
/// call changes nothing.
pub fn use_master_keys(engine: &Engine, keys: MasterKeys) {
    let _ = engine.settings_cache().keys.set(keys);
}

fn master_keys(engine: &Engine) -> Result<&MasterKeys, StoreError> {
    engine.settings_cache().keys.get().ok_or_else(|| {
        StoreError::Unreadable(
            "secrets are encrypted, and this engine was given no master key".into(),
        )
    })
}

impl SettingsCache {
    fn fresh(&self) -> Option<Arc<TemplateValues>> {
        let current = self.current.read().expect("settings cache poisoned");
        match current.as_ref() {
            Some((at, values)) if at.elapsed() < FRESH_FOR => Some(values.clone()),
            _ => None,
        }
    }
}

/// A secret as listed: its name and when it was set, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    pub name: String,
    pub updated_at: Millis,
}

/// Every variable, by name.
pub async fn variables(engine: &Engine) -> Result<Vec<Setting>, StoreError> {
    engine.store().settings(VARS).await
}

/// Every secret, by name, without its value.
pub async fn secrets(engine: &Engine) -> Result<Vec<SecretEntry>, StoreError> {
    Ok(engine
        .store()
        .settings(SECRETS)
        .await?
        .into_iter()
        .map(|s| SecretEntry {
            name: s.name,
            updated_at: s.updated_at,
        })
        .collect())
}

/// The stored variables and secrets, at most a second old.
pub async fn template_values(engine: &Engine) -> Result<Arc<TemplateValues>, StoreError> {
    let cache = engine.settings_cache();
    if let Some(values) = cache.fresh() {
        return Ok(values);
    }
    let _refreshing = cache.refresh.lock().await;
    if let Some(values) = cache.fresh() {
        return Ok(values);
    }
    let vars = variables(engine)
        .await?
        .into_iter()
        .map(|s| (s.name, s.value))
        .collect();
    let mut secrets = BTreeMap::new();
    let stored = engine.store().settings(SECRETS).await?;
    if !stored.is_empty() {
        let keys = master_keys(engine)?;
        for s in stored {
            if let Value::String(v) = keys.open(SECRETS, &s.name, &s.value)? {
                secrets.insert(s.name, v);
            }
        }
    }
    let values = Arc::new(TemplateValues { vars, secrets });
    *cache.current.write().expect("settings cache poisoned") =
        Some((Instant::now(), values.clone()));
    Ok(values)
}

/// Sets a variable or a secret (encrypted) for `actor`.
pub async fn put(
    engine: &Engine,
    namespace: &str,
    name: &str,
    value: &Value,
    actor: &str,
) -> Result<(), StoreError> {
    let value = if namespace == SECRETS {
        master_keys(engine)?.seal(namespace, name, value)
    } else {
        value.clone()
    };
    let change = SettingChange::Put {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        value,
    };
    write(engine, change, "set", actor).await?;
    Ok(())
}

/// Returns whether the setting existed.
pub async fn delete(
    engine: &Engine,
    namespace: &str,
    name: &str,
    actor: &str,
) -> Result<bool, StoreError> {
    let change = SettingChange::Delete {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    write(engine, change, "delete", actor).await
}

/// Writes one change with its audit entry (`variable.set`, `secret.delete`, ...), which never
/// holds the value.
async fn write(
    engine: &Engine,
    change: SettingChange,
    verb: &str,
    actor: &str,
) -> Result<bool, StoreError> {
    let (namespace, name) = match &change {
        SettingChange::Put {
            namespace, name, ..
        }
        | SettingChange::Delete { namespace, name }
        | SettingChange::Swap {
            namespace, name, ..
        } => (namespace, name),
    };
    let kind = if namespace == SECRETS {
        "secret"
    } else {
        "variable"
    };
    let audit = NewAuditEntry {
        actor: actor.to_owned(),
        action: format!("{kind}.{verb}"),
        target: name.clone(),
        detail: json!({}),
    };
    let applied = engine
        .store()
        .change_settings(vec![change], Some(audit), engine.now())
        .await?;
    forget(engine).await;
    Ok(applied == [true])
}

async fn forget(engine: &Engine) {
    let cache = engine.settings_cache();
    let _refreshing = cache.refresh.lock().await;
    *cache.current.write().expect("settings cache poisoned") = None;
}
