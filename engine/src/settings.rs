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

#[derive(Default)]
pub(crate) struct SettingsCache(tokio::sync::Mutex<Option<(Instant, Arc<TemplateValues>)>>);

/// The stored variables and secrets, at most a second old.
pub async fn template_values(engine: &Engine) -> Result<Arc<TemplateValues>, StoreError> {
    // One caller refreshes while the others wait for its answer instead of querying too.
    let mut cached = engine.settings_cache().0.lock().await;
    if let Some((at, values)) = cached.as_ref()
        && at.elapsed() < FRESH_FOR
    {
        return Ok(values.clone());
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
    *cached = Some((Instant::now(), values.clone()));
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
    *engine.settings_cache().0.lock().await = None;
}
