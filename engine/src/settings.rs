//! Template variables and secrets that operators set at runtime (over the API), stored in the
//! `vars` and `secrets` settings namespaces. Workers read them through a per-process cache,
//! refreshed at most once a second and dropped as soon as this process changes a setting: a
//! change made through another process reaches new steps here within a second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::service::Engine;
use crate::store::StoreError;

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
    let store = engine.store();
    let vars = store
        .settings(VARS)
        .await?
        .into_iter()
        .map(|s| (s.name, s.value))
        .collect();
    let secrets = store
        .settings(SECRETS)
        .await?
        .into_iter()
        .filter_map(|s| match s.value {
            Value::String(v) => Some((s.name, v)),
            _ => None,
        })
        .collect();
    let values = Arc::new(TemplateValues { vars, secrets });
    *cache.current.write().expect("settings cache poisoned") =
        Some((Instant::now(), values.clone()));
    Ok(values)
}

pub async fn put(
    engine: &Engine,
    namespace: &str,
    name: &str,
    value: &Value,
) -> Result<(), StoreError> {
    engine
        .store()
        .put_setting(namespace, name, value, engine.now())
        .await?;
    forget(engine).await;
    Ok(())
}

/// Returns whether the setting existed.
pub async fn delete(engine: &Engine, namespace: &str, name: &str) -> Result<bool, StoreError> {
    let existed = engine.store().delete_setting(namespace, name).await?;
    forget(engine).await;
    Ok(existed)
}

async fn forget(engine: &Engine) {
    let cache = engine.settings_cache();
    let _refreshing = cache.refresh.lock().await;
    *cache.current.write().expect("settings cache poisoned") = None;
}
