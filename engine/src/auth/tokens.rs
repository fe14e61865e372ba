//! Bearer tokens: HS256 JWTs whose header names the signing key (`kid`). The keys are one
//! settings row, `system/jwt_signing_key`, encrypted under the master key: the newest key signs,
//! and a rotated one keeps verifying until its grace period ends. Every process reads the keys
//! again every few seconds, and at once (at most once a second) when a token names a key it does
//! not know, so a rotation needs no restart.
//!
//! A revoked token's id is in the store's deny list; each process checks a copy of it at most a
//! second old, and adds what it revokes itself at once.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{AuthError, Role, SYSTEM, UserSession};
use crate::keys::MasterKeys;
use crate::service::Engine;
use crate::state::Millis;
use crate::store::{NewAuditEntry, SettingChange, Store, TokenRevocation};

const SIGNING_KEY: &str = "jwt_signing_key";
/// HS256 keys shorter than the hash output weaken it.
pub(super) const MIN_SECRET_BYTES: usize = 32;
/// The longest a token may live; a revocation is remembered that long unless told less.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);
/// A process reads the signing keys again after this long, so it signs with a rotated key soon.
const KEYS_FRESH_FOR: Duration = Duration::from_secs(10);
/// A token naming an unknown key reads the keys again, but no more often than this.
const UNKNOWN_KEY_RELOAD: Duration = Duration::from_secs(1);
const REVOCATIONS_FRESH_FOR: Duration = Duration::from_secs(1);

/// The claims of a token. Times are seconds since the epoch, as JWT has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user, or what the token was issued for.
    pub sub: String,
    pub role: Role,
    pub iat: i64,
    pub exp: i64,
    /// Distinguishes tokens issued in the same second, names one in logs, and revokes it.
    pub jti: String,
    /// On a login's token: when the user was last changed, as it was at login. Changing or
    /// deleting the user ends every session it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_version: Option<Millis>,
}

/// One signing key as stored (inside the encrypted row). `secret` is used as its bytes, as the
/// key from before rotation was.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    secret: String,
    created_at: Millis,
    /// When it stops verifying; `None` while it is current.
    retires_at: Option<Millis>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredKeys {
    keys: Vec<StoredKey>,
}

impl StoredKeys {
    fn fresh(now: Millis) -> Self {
        StoredKeys {
            keys: vec![StoredKey {
                secret: hex::encode(rand::random::<[u8; 32]>()),
                created_at: now,
                retires_at: None,
            }],
        }
    }

    /// The row's plaintext: the key set, or a bare string, the one key of before rotation.
    fn from_value(value: serde_json::Value) -> Result<Self, AuthError> {
        match value {
            serde_json::Value::String(secret) => Ok(StoredKeys {
                keys: vec![StoredKey {
                    secret,
                    created_at: 0,
                    retires_at: None,
                }],
            }),
            other => serde_json::from_value(other)
                .map_err(|e| AuthError::Signing(format!("the stored signing keys: {e}"))),
        }
    }
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    retires_at: Option<Millis>,
}

impl SigningKey {
    fn new(secret: &[u8], retires_at: Option<Millis>) -> Result<Self, AuthError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(AuthError::WeakSecret);
        }
        Ok(SigningKey {
            kid: hex::encode(&Sha256::digest(secret)[..4]),
            encoding: EncodingKey::from_secret(secret).map_err(|_| AuthError::WeakSecret)?,
            decoding: DecodingKey::from_secret(secret).map_err(|_| AuthError::WeakSecret)?,
            retires_at,
        })
    }

    fn verifies_at(&self, now: Millis) -> bool {
        self.retires_at.is_none_or(|at| now < at)
    }
}

/// Signing keys in memory: the first signs, each verifies until it retires. Pure: no store.
pub struct KeySet {
    keys: Vec<SigningKey>,
    validation: Validation,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        write!(f, "KeySet({})", kids.join(", "))
    }
}

impl KeySet {
    /// One key that never retires, such as `SWITCHYARD_JWT_SECRET`.
    pub fn from_secret(secret: &[u8]) -> Result<Self, AuthError> {
        Self::new(vec![SigningKey::new(secret, None)?])
    }

    fn from_stored(stored: &StoredKeys) -> Result<Self, AuthError> {
        let mut keys: Vec<&StoredKey> = stored.keys.iter().collect();
        // The current key (not retiring) signs: the newest of them, should a race leave two.
        keys.sort_by_key(|k| (k.retires_at.is_some(), std::cmp::Reverse(k.created_at)));
        Self::new(
            keys.into_iter()
                .map(|k| SigningKey::new(k.secret.as_bytes(), k.retires_at))
                .collect::<Result<_, _>>()?,
        )
    }

    fn new(keys: Vec<SigningKey>) -> Result<Self, AuthError> {
        if keys.is_empty() {
            return Err(AuthError::Signing("no signing key is stored".into()));
        }
        // The algorithm is pinned: a token that names another one is refused, never trusted.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        // jsonwebtoken reads the system clock; checking `exp` ourselves keeps the engine's.
        validation.validate_exp = false;
        Ok(KeySet { keys, validation })
    }

    fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid == kid)
    }

    /// The id of the key that signs.
    pub fn signing_kid(&self) -> &str {
        &self.keys[0].kid
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let key = &self.keys[0];
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
            .map_err(|e| AuthError::Signing(e.to_string()))
    }

    /// The claims of a token signed with a key of this set that still verifies, not expired at
    /// `now`. A token without a `kid` (issued before keys rotated) may match any of them.
    pub fn verify(&self, token: &str, now: Millis) -> Result<Claims, AuthError> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::InvalidToken)?
            .kid;
        let claims = self
            .keys
            .iter()
            .filter(|k| k.verifies_at(now) && kid.as_ref().is_none_or(|kid| *kid == k.kid))
            .find_map(|k| jsonwebtoken::decode::<Claims>(token, &k.decoding, &self.validation).ok())
            .ok_or(AuthError::InvalidToken)?
            .claims;
        if claims.exp <= now.div_euclid(1000) {
            return Err(AuthError::InvalidToken);
        }
        Ok(claims)
    }
}

/// The token keys of a process, and its copy of the revocation list.
#[derive(Clone)]
pub struct TokenKeys(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    /// `None` when `SWITCHYARD_JWT_SECRET` fixes the key: nothing to reload or rotate.
    master: Option<MasterKeys>,
    set: RwLock<(Instant, Arc<KeySet>)>,
    reloading: tokio::sync::Mutex<()>,
    revoked: RwLock<Option<(Instant, HashSet<String>)>>,
    refreshing_revoked: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    /// The key from `secret` when given (`SWITCHYARD_JWT_SECRET`), else the ones stored in the
    /// database, generated by the first process that asked.
    pub async fn load(
        engine: &Engine,
        master: &MasterKeys,
        secret: Option<&str>,
    ) -> Result<Self, AuthError> {
        let store = engine.store().clone();
        let (master, set) = match secret {
            Some(secret) => (None, KeySet::from_secret(secret.as_bytes())?),
            None => {
                let (_, stored) = read_stored(&*store, master, engine.now()).await?;
                (Some(master.clone()), KeySet::from_stored(&stored)?)
            }
        };
        Ok(TokenKeys(Arc::new(Inner {
            store,
            master,
            set: RwLock::new((Instant::now(), Arc::new(set))),
            reloading: Default::default(),
            revoked: RwLock::new(None),
            refreshing_revoked: Default::default(),
        })))
    }

    fn current(&self) -> (Instant, Arc<KeySet>) {
        let set = self.0.set.read().expect("key set lock poisoned");
        (set.0, set.1.clone())
    }

    /// Issues a token for `subject`, with `actor` as its issuer in the audit log, where its id
    /// (`jti`) is found to revoke it.
    pub async fn issue(
        &self,
        subject: &str,
        role: Role,
        ttl: Duration,
        actor: &str,
        now: Millis,
    ) -> Result<(String, Claims), AuthError> {
        let (token, claims) = self.issue_claims(claims(subject, role, ttl, now)?)?;
        let audit = NewAuditEntry {
            actor: actor.to_owned(),
            action: "token.issue".into(),
            target: claims.jti.clone(),
            detail: json!({
                "subject": claims.sub,
                "role": claims.role,
                "expires_at": claims.exp,
            }),
        };
        self.0.store.record_audit(audit, now).await?;
        Ok((token, claims))
    }

    /// A token for a user who just logged in: it lives while the user stays as it is now.
    pub fn issue_session(
        &self,
        user: &UserSession,
        ttl: Duration,
        now: Millis,
    ) -> Result<(String, Claims), AuthError> {
        let mut claims = claims(&user.name, user.role, ttl, now)?;
        claims.user_version = Some(user.version);
        self.issue_claims(claims)
    }

    fn issue_claims(&self, claims: Claims) -> Result<(String, Claims), AuthError> {
        Ok((self.current().1.sign(&claims)?, claims))
    }

    /// The claims of a token signed with a current key, not expired at `now` and not revoked.
    pub async fn verify(&self, token: &str, now: Millis) -> Result<Claims, AuthError> {
        let (loaded_at, mut set) = self.current();
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::InvalidToken)?
            .kid;
        if let Some(kid) = &kid
            && !set.knows(kid)
        {
            set = self.reload_for(kid, now).await?;
        } else if loaded_at.elapsed() >= KEYS_FRESH_FOR {
            set = self.reload_stale(now).await?;
        }
        let claims = set.verify(token, now)?;
        if self.is_revoked(&claims.jti, now).await? {
            return Err(AuthError::Revoked);
        }
        Ok(claims)
    }

    /// The keys read again for a token naming `kid`, which this process does not know (a key
    /// made since). One caller reads, the others wait for it; reads are a second apart at least,
    /// so tokens naming made-up keys cost the database one read a second.
    async fn reload_for(&self, kid: &str, now: Millis) -> Result<Arc<KeySet>, AuthError> {
        if self.0.master.is_none() {
            return Ok(self.current().1);
        }
        let _reloading = self.0.reloading.lock().await;
        let (loaded_at, set) = self.current();
        if set.knows(kid) {
            return Ok(set);
        }
        tokio::time::sleep(UNKNOWN_KEY_RELOAD.saturating_sub(loaded_at.elapsed())).await;
        self.load_now(now).await
    }

    /// The keys read again when they are older than [`KEYS_FRESH_FOR`], unless another caller is
    /// reading them: then the ones at hand.
    async fn reload_stale(&self, now: Millis) -> Result<Arc<KeySet>, AuthError> {
        let (loaded_at, set) = self.current();
        if self.0.master.is_none() || loaded_at.elapsed() < KEYS_FRESH_FOR {
            return Ok(set);
        }
        let Ok(_reloading) = self.0.reloading.try_lock() else {
            return Ok(set);
        };
        self.load_now(now).await
    }

    async fn load_now(&self, now: Millis) -> Result<Arc<KeySet>, AuthError> {
        let master = self
            .0
            .master
            .as_ref()
            .expect("stored keys have a master key");
        let (_, stored) = read_stored(&*self.0.store, master, now).await?;
        let set = Arc::new(KeySet::from_stored(&stored)?);
        *self.0.set.write().expect("key set lock poisoned") = (Instant::now(), set.clone());
        Ok(set)
    }

    /// Makes a new signing key current; the ones before it keep verifying for `grace`, then
    /// stop (0: at once, for a key that leaked). Returns the new key's id.
    pub async fn rotate(
        &self,
        grace: Duration,
        actor: &str,
        now: Millis,
    ) -> Result<String, AuthError> {
        let Some(master) = &self.0.master else {
            return Err(AuthError::Signing(
                "the signing key comes from SWITCHYARD_JWT_SECRET: change it there".into(),
            ));
        };
        let grace_ms = Millis::try_from(grace.as_millis()).unwrap_or(Millis::MAX / 4);
        // A rotation racing another one is tried again on top of it.
        for _ in 0..5 {
            let (stored_value, mut stored) = read_stored(&*self.0.store, master, now).await?;
            stored
                .keys
                .retain(|k| k.retires_at.is_none_or(|at| at > now));
            for key in &mut stored.keys {
                let retires = now + grace_ms;
                key.retires_at = Some(key.retires_at.map_or(retires, |at| at.min(retires)));
            }
            let fresh = StoredKeys::fresh(now).keys.remove(0);
            let kid = SigningKey::new(fresh.secret.as_bytes(), None)?.kid;
            stored.keys.push(fresh);
            let new = master.seal(SYSTEM, SIGNING_KEY, &json!(stored));
            let audit = NewAuditEntry {
                actor: actor.to_owned(),
                action: "keys.rotate_signing".into(),
                target: SIGNING_KEY.into(),
                detail: json!({ "kid": kid, "grace_secs": grace.as_secs() }),
            };
            let swapped = self
                .0
                .store
                .change_settings(
                    vec![SettingChange::Swap {
                        namespace: SYSTEM.into(),
                        name: SIGNING_KEY.into(),
                        old: stored_value,
                        new,
                    }],
                    Some(audit),
                    now,
                )
                .await?;
            if swapped == [true] {
                let set = Arc::new(KeySet::from_stored(&stored)?);
                *self.0.set.write().expect("key set lock poisoned") = (Instant::now(), set);
                return Ok(kid);
            }
        }
        Err(AuthError::Signing(
            "the signing keys kept changing during the rotation; try again".into(),
        ))
    }

    /// Revokes the token `jti` (idempotent), recording who did it. Its tokens are refused by this
    /// process at once and by the others within a second. Returns whether this call revoked it.
    pub async fn revoke(&self, jti: &str, actor: &str, now: Millis) -> Result<bool, AuthError> {
        let max_ttl_ms = Millis::try_from(MAX_TTL.as_millis()).expect("a year fits");
        let revoked = self
            .0
            .store
            .revoke_token(
                TokenRevocation {
                    jti: jti.to_owned(),
                    expires_at: now + max_ttl_ms,
                    revoked_by: actor.to_owned(),
                },
                NewAuditEntry {
                    actor: actor.to_owned(),
                    action: "token.revoke".into(),
                    target: jti.to_owned(),
                    detail: json!({}),
                },
                now,
            )
            .await?;
        if let Some((_, jtis)) = self
            .0
            .revoked
            .write()
            .expect("revocations lock poisoned")
            .as_mut()
        {
            jtis.insert(jti.to_owned());
        }
        Ok(revoked)
    }

    async fn is_revoked(&self, jti: &str, now: Millis) -> Result<bool, AuthError> {
        let fresh = |revoked: &Option<(Instant, HashSet<String>)>| {
            revoked
                .as_ref()
                .filter(|(at, _)| at.elapsed() < REVOCATIONS_FRESH_FOR)
                .map(|(_, jtis)| jtis.contains(jti))
        };
        if let Some(found) = fresh(&self.0.revoked.read().expect("revocations lock poisoned")) {
            return Ok(found);
        }
        let _refreshing = self.0.refreshing_revoked.lock().await;
        if let Some(found) = fresh(&self.0.revoked.read().expect("revocations lock poisoned")) {
            return Ok(found);
        }
        let jtis: HashSet<String> = self
            .0
            .store
            .revoked_tokens(now)
            .await?
            .into_iter()
            .collect();
        let found = jtis.contains(jti);
        *self.0.revoked.write().expect("revocations lock poisoned") = Some((Instant::now(), jtis));
        Ok(found)
    }
}

fn claims(subject: &str, role: Role, ttl: Duration, now: Millis) -> Result<Claims, AuthError> {
    if ttl > MAX_TTL {
        return Err(AuthError::TtlTooLong);
    }
    let iat = now.div_euclid(1000);
    Ok(Claims {
        sub: subject.to_owned(),
        role,
        iat,
        exp: iat + i64::try_from(ttl.as_secs()).expect("at most a year"),
        jti: uuid::Uuid::new_v4().to_string(),
        user_version: None,
    })
}

/// The stored row as it is and the keys in it, creating it if missing.
async fn read_stored(
    store: &dyn Store,
    master: &MasterKeys,
    now: Millis,
) -> Result<(serde_json::Value, StoredKeys), AuthError> {
    let fresh = master.seal(SYSTEM, SIGNING_KEY, &json!(StoredKeys::fresh(now)));
    let stored = store.init_setting(SYSTEM, SIGNING_KEY, &fresh, now).await?;
    let keys = StoredKeys::from_value(master.open(SYSTEM, SIGNING_KEY, &stored)?)?;
    Ok((stored, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_800_000_000_000;
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn keys(secret: &str) -> KeySet {
        KeySet::from_secret(secret.as_bytes()).unwrap()
    }

    fn token(set: &KeySet, role: Role, ttl_secs: u64) -> (String, Claims) {
        let claims = claims("ops", role, Duration::from_secs(ttl_secs), NOW).unwrap();
        (set.sign(&claims).unwrap(), claims)
    }

    #[test]
    fn issued_token_verifies_with_its_role_and_names_its_key() {
        let keys = keys(SECRET);
        let (token, claims) = token(&keys, Role::Operator, 60);
        assert_eq!(keys.verify(&token, NOW).unwrap(), claims);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(keys.signing_kid()));
    }

    #[test]
    fn expired_token_is_rejected() {
        let keys = keys(SECRET);
        let (token, _) = token(&keys, Role::Admin, 60);
        assert!(keys.verify(&token, NOW + 59_000).is_ok());
        assert!(matches!(
            keys.verify(&token, NOW + 60_000),
            Err(AuthError::InvalidToken)
        ));
    }

    #[test]
    fn token_signed_with_another_key_is_rejected() {
        let (token, _) = token(
            &keys("another secret of thirty-two bytes!"),
            Role::Admin,
            60,
        );
        assert!(keys(SECRET).verify(&token, NOW).is_err());
    }

    #[test]
    fn token_with_its_role_edited_is_rejected() {
        use base64::Engine;
        let keys = keys(SECRET);
        let (token, claims) = token(&keys, Role::Viewer, 60);
        let parts: Vec<&str> = token.split('.').collect();
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = Claims {
            role: Role::Admin,
            ..claims
        };
        let body = engine.encode(serde_json::to_vec(&forged).unwrap());
        let forged = format!("{}.{body}.{}", parts[0], parts[2]);
        assert!(keys.verify(&forged, NOW).is_err());
    }

    #[test]
    fn unsigned_token_is_rejected() {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = engine.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = engine.encode(
            serde_json::to_vec(
                &json!({"sub": "x", "role": "admin", "iat": 0, "exp": i64::MAX / 4, "jti": "j"}),
            )
            .unwrap(),
        );
        assert!(
            keys(SECRET)
                .verify(&format!("{header}.{body}."), NOW)
                .is_err()
        );
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(matches!(
            KeySet::from_secret(b"short"),
            Err(AuthError::WeakSecret)
        ));
    }

    #[test]
    fn a_token_lives_at_most_a_year() {
        assert!(matches!(
            claims("x", Role::Viewer, MAX_TTL + Duration::from_secs(1), NOW),
            Err(AuthError::TtlTooLong)
        ));
    }

    #[test]
    fn a_retired_key_verifies_until_its_grace_ends_and_a_token_without_kid_still_verifies() {
        let old = StoredKey {
            secret: SECRET.into(),
            created_at: 0,
            retires_at: Some(NOW + 1_000),
        };
        let new = StoredKeys::fresh(NOW).keys.remove(0);
        let set = KeySet::from_stored(&StoredKeys {
            keys: vec![old, new.clone()],
        })
        .unwrap();
        assert_eq!(
            set.signing_kid(),
            SigningKey::new(new.secret.as_bytes(), None).unwrap().kid,
            "the current key signs"
        );
        // Signed before rotation, by the one key there was, without a `kid`.
        let claims = claims("ops", Role::Viewer, Duration::from_secs(60), NOW).unwrap();
        let legacy = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(set.verify(&legacy, NOW + 999).is_ok());
        assert!(set.verify(&legacy, NOW + 1_000).is_err());
    }

    #[test]
    fn the_stored_key_from_before_rotation_is_read_as_one_current_key() {
        let stored = StoredKeys::from_value(json!(SECRET)).unwrap();
        let set = KeySet::from_stored(&stored).unwrap();
        assert_eq!(set.signing_kid(), keys(SECRET).signing_kid());
    }
}
