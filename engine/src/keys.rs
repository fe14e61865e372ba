//! Master keys, and the settings they keep encrypted at rest: every secret and the token signing
//! keys are stored as XChaCha20-Poly1305 envelopes,
//! `{"enc": "xchacha20poly1305", "kid": ..., "nonce": ..., "ct": ...}`, in the row's `value`.
//! The associated data is the row's `namespace/name`, so a ciphertext copied into another row does
//! not open there.
//!
//! A master key never lives in the database it protects: it comes from `SWITCHYARD_MASTER_KEY`
//! (64 hex characters; a comma-separated list, the first encrypting and all decrypting, lets a new
//! key be rolled out without downtime), from a key file, or from a key file generated once beside
//! a SQLite database.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::service::Engine;
use crate::store::{NewAuditEntry, SettingChange, StoreError};

pub const KEY_ENV: &str = "SWITCHYARD_MASTER_KEY";
pub const KEY_FILE_ENV: &str = "SWITCHYARD_MASTER_KEY_FILE";
const CIPHER: &str = "xchacha20poly1305";
/// Every value of these namespaces is stored encrypted: secrets, and the token signing keys.
pub const ENCRYPTED_NAMESPACES: [&str; 2] = [crate::settings::SECRETS, crate::auth::SYSTEM];
const HOW_TO_SUPPLY: &str = "give it in SWITCHYARD_MASTER_KEY (64 hex characters; a \
    comma-separated list may hold several, the first encrypting) or in the file named by \
    --master-key-file (SWITCHYARD_MASTER_KEY_FILE)";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key that does not parse; the message names where it came from.
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "setting {row} is encrypted under master key {kid}, which this process was not given: \
         {HOW_TO_SUPPLY}"
    )]
    UnknownKey { row: String, kid: String },
    #[error(
        "setting {row} does not decrypt under master key {kid}: it was altered, or copied from \
         another row"
    )]
    Tampered { row: String, kid: String },
    #[error("setting {row}: {message}")]
    Malformed { row: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<KeyError> for StoreError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Store(e) => e,
            other => StoreError::Unreadable(other.to_string()),
        }
    }
}

struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The master keys of this process: the first encrypts, all decrypt.
#[derive(Clone)]
pub struct MasterKeys(Arc<Vec<MasterKey>>);

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKeys({})", self.ids().join(", "))
    }
}

impl MasterKeys {
    /// Keys as hex, separated by commas or line breaks; `origin` names where they came from in
    /// errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyError> {
        let invalid = |message: String| KeyError::Invalid {
            origin: origin.to_owned(),
            message,
        };
        let mut keys = Vec::new();
        for (n, hex_key) in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .enumerate()
        {
            let bytes = hex::decode(hex_key)
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| {
                    invalid(format!("key {} is not 64 hex characters (32 bytes)", n + 1))
                })?;
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
                .map_err(|_| invalid(format!("key {} has the wrong length", n + 1)))?;
            keys.push(MasterKey {
                id: key_id(&bytes),
                cipher,
            });
        }
        if keys.is_empty() {
            return Err(invalid("no key: expected 64 hex characters".into()));
        }
        Ok(MasterKeys(Arc::new(keys)))
    }

    /// The keys of `SWITCHYARD_MASTER_KEY` (`env`), else of the key file `file`, else of
    /// `default_file`, which is created with a new key (mode 0600) when missing. Without any of
    /// them (an in-memory database) a key lives as long as the process.
    pub fn load(
        env: Option<&str>,
        file: Option<&Path>,
        default_file: Option<&Path>,
    ) -> Result<Self, KeyError> {
        if let Some(text) = env {
            return Self::parse(text, KEY_ENV);
        }
        if let Some(path) = file {
            return Self::read(path);
        }
        let Some(path) = default_file else {
            return Self::parse(&new_key_hex(), "a key of this process");
        };
        if !path.exists() {
            create_key_file(path)?;
        }
        Self::read(path)
    }

    fn read(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::File {
            path: path.display().to_string(),
            source,
        })?;
        warn_if_readable_by_others(path);
        Self::parse(&text, &path.display().to_string())
    }

    /// The key ids, the encrypting one first: the first 8 hex characters of each key's SHA-256.
    pub fn ids(&self) -> Vec<&str> {
        self.0.iter().map(|k| k.id.as_str()).collect()
    }

    fn current(&self) -> &MasterKey {
        &self.0[0]
    }

    /// `value` encrypted under the first key, for the row `namespace/name`.
    pub fn seal(&self, namespace: &str, name: &str, value: &Value) -> Value {
        let key = self.current();
        let nonce: [u8; 24] = rand::random();
        let plaintext = serde_json::to_vec(value).expect("JSON values serialize");
        let aad = row(namespace, name);
        let ct = key
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
        let b64 = base64::engine::general_purpose::STANDARD;
        json!({
            "enc": CIPHER,
            "kid": key.id,
            "nonce": b64.encode(nonce),
            "ct": b64.encode(ct),
        })
    }

    /// The value of the row `namespace/name` as stored: decrypted when sealed, as it is when it
    /// predates encryption (it is sealed on the next start).
    pub fn open(&self, namespace: &str, name: &str, stored: &Value) -> Result<Value, KeyError> {
        let Some(envelope) = Envelope::of(stored) else {
            return Ok(stored.clone());
        };
        let row = row(namespace, name);
        let malformed = |message: &str| KeyError::Malformed {
            row: row.clone(),
            message: message.to_owned(),
        };
        if envelope.cipher != CIPHER {
            return Err(malformed(&format!("unknown cipher {:?}", envelope.cipher)));
        }
        let key = self
            .0
            .iter()
            .find(|k| k.id == envelope.kid)
            .ok_or_else(|| KeyError::UnknownKey {
                row: row.clone(),
                kid: envelope.kid.to_owned(),
            })?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce: [u8; 24] = b64
            .decode(envelope.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| malformed("the nonce is not 24 bytes of base64"))?;
        let ct = b64
            .decode(envelope.ct)
            .map_err(|_| malformed("the ciphertext is not base64"))?;
        let plaintext = key
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &ct,
                    aad: row.as_bytes(),
                },
            )
            .map_err(|_| KeyError::Tampered {
                row: row.clone(),
                kid: key.id.clone(),
            })?;
        serde_json::from_slice(&plaintext).map_err(|_| malformed("the plaintext is not JSON"))
    }

    /// Whether `stored` is sealed under the first key: nothing to re-encrypt.
    fn sealed_under_current(&self, stored: &Value) -> bool {
        Envelope::of(stored).is_some_and(|e| e.kid == self.current().id)
    }
}

/// The fields of a sealed value.
struct Envelope<'a> {
    cipher: &'a str,
    kid: &'a str,
    nonce: &'a str,
    ct: &'a str,
}

impl<'a> Envelope<'a> {
    fn of(stored: &'a Value) -> Option<Self> {
        let field = |name| stored.get(name).and_then(Value::as_str);
        Some(Envelope {
            cipher: field("enc")?,
            kid: field("kid").unwrap_or_default(),
            nonce: field("nonce").unwrap_or_default(),
            ct: field("ct").unwrap_or_default(),
        })
    }
}

fn row(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn key_id(key: &[u8]) -> String {
    hex::encode(&Sha256::digest(key)[..4])
}

fn new_key_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Writes a new key to `path`, readable by its owner only. Processes starting together may race:
/// the file appears whole or not at all (written aside, then linked into place), and a loser
/// reads the winner's.
fn create_key_file(path: &Path) -> Result<(), KeyError> {
    let io = |source| KeyError::File {
        path: path.display().to_string(),
        source,
    };
    let aside = path.with_extension(format!("new-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&aside).map_err(io)?;
    let written = writeln!(file, "{}", new_key_hex()).and_then(|()| file.sync_all());
    let linked = written.and_then(|()| std::fs::hard_link(&aside, path));
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => {
            tracing::warn!(
                path = %path.display(),
                "generated a master key for the secrets and signing keys in the database: back \
                 this file up (without it they cannot be read), or give the key in \
                 SWITCHYARD_MASTER_KEY"
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the master key file is readable by other users: chmod 600 it"
            );
        }
    }
}

/// The key file used when no key is given: `<database file>.key` beside a SQLite database,
/// `./switchyard.key` for PostgreSQL, none for an in-memory database.
pub fn default_key_file(database_url: &str) -> Option<PathBuf> {
    if database_url.starts_with("sqlite:") {
        crate::store::sqlite_file(database_url).map(|file| {
            let mut name = file.into_os_string();
            name.push(".key");
            PathBuf::from(name)
        })
    } else {
        Some(PathBuf::from("switchyard.key"))
    }
}

/// Encrypts, under the first key, every value of the encrypted namespaces that is not already
/// encrypted under it: plaintext rows from before encryption (`reseal_all` false), or every row
/// (`reseal_all` true, a key rotation). One transaction; a row changed meanwhile keeps its new
/// value. Returns how many rows were rewritten. Any number of processes may run it at once.
pub async fn reseal(
    engine: &Engine,
    keys: &MasterKeys,
    reseal_all: bool,
    actor: &str,
) -> Result<usize, KeyError> {
    let store = engine.store();
    let mut changes = Vec::new();
    for namespace in ENCRYPTED_NAMESPACES {
        for setting in store.settings(namespace).await? {
            let sealed = Envelope::of(&setting.value).is_some();
            if (sealed && !reseal_all) || keys.sealed_under_current(&setting.value) {
                continue;
            }
            // Opened first: a row under a key this process lacks stops the rotation unchanged.
            let value = keys.open(namespace, &setting.name, &setting.value)?;
            changes.push(SettingChange::Swap {
                namespace: namespace.to_owned(),
                new: keys.seal(namespace, &setting.name, &value),
                name: setting.name,
                old: setting.value,
            });
        }
    }
    if changes.is_empty() {
        return Ok(0);
    }
    let audit = NewAuditEntry {
        actor: actor.to_owned(),
        action: if reseal_all {
            "keys.rotate"
        } else {
            "keys.encrypt_plaintext"
        }
        .to_owned(),
        target: ENCRYPTED_NAMESPACES.join(","),
        detail: json!({ "rows": changes.len(), "kid": keys.current().id }),
    };
    let applied = store
        .change_settings(changes, Some(audit), engine.now())
        .await?;
    Ok(applied.into_iter().filter(|a| *a).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const KEY_B: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f";

    fn keys(text: &str) -> MasterKeys {
        MasterKeys::parse(text, "test").unwrap()
    }

    #[test]
    fn a_sealed_value_opens_to_itself_and_hides_it() {
        let keys = keys(KEY_A);
        let sealed = keys.seal("secrets", "api", &json!("sk-4711"));
        assert!(!sealed.to_string().contains("sk-4711"), "{sealed}");
        assert_eq!(sealed["kid"], keys.ids()[0]);
        assert_eq!(
            keys.open("secrets", "api", &sealed).unwrap(),
            json!("sk-4711")
        );
    }

    #[test]
    fn a_ciphertext_moved_to_another_row_does_not_open() {
        let keys = keys(KEY_A);
        let sealed = keys.seal("secrets", "api", &json!("sk-4711"));
        assert!(matches!(
            keys.open("secrets", "other", &sealed),
            Err(KeyError::Tampered { .. })
        ));
    }

    #[test]
    fn an_unknown_key_id_is_named_with_how_to_supply_the_key() {
        let sealed = keys(KEY_B).seal("secrets", "api", &json!("x"));
        let message = keys(KEY_A)
            .open("secrets", "api", &sealed)
            .unwrap_err()
            .to_string();
        assert!(message.contains(keys(KEY_B).ids()[0]), "{message}");
        assert!(message.contains("SWITCHYARD_MASTER_KEY"), "{message}");
    }

    #[test]
    fn the_first_key_encrypts_and_every_key_decrypts() {
        let old = keys(KEY_A).seal("system", "k", &json!(1));
        let both = keys(&format!("{KEY_B},{KEY_A}"));
        assert_eq!(both.open("system", "k", &old).unwrap(), json!(1));
        assert_eq!(both.seal("system", "k", &json!(2))["kid"], both.ids()[0]);
        assert_ne!(both.ids()[0], both.ids()[1]);
    }

    #[test]
    fn a_malformed_key_is_refused_naming_its_origin() {
        let error = MasterKeys::parse("abcd", KEY_ENV).unwrap_err().to_string();
        assert!(error.starts_with(KEY_ENV), "{error}");
        assert!(error.contains("64 hex"), "{error}");
        assert!(MasterKeys::parse(" , ", "file").is_err());
    }

    #[test]
    fn a_generated_key_file_is_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("switchyard-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.key");
        let first = MasterKeys::load(None, None, Some(&path)).unwrap();
        let again = MasterKeys::load(None, None, Some(&path)).unwrap();
        assert_eq!(first.ids(), again.ids());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
