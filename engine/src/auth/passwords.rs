//! Users and their argon2id password hashes. A hash takes 19 MiB of memory and most of a core for
//! tens of milliseconds, so hashes run only on a few dedicated threads, as many as the machine has
//! cores, each reusing one work area: memory does not grow with the number of logins, and a
//! flood of them leaves the async threads free. A hash waits in a short queue; when the queue is
//! full, or a hash waited past its deadline, the caller is told to come back (`AuthError::Busy`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{AuthError, Claims, Role, USERS};
use crate::service::Engine;
use crate::state::Millis;
use crate::store::{NewAuditEntry, SettingChange, StoreError};

/// Hashes waiting per hashing thread before callers are turned away at once.
const QUEUED_PER_THREAD: usize = 16;
/// How long a hash may wait for a thread.
const QUEUE_DEADLINE: Duration = Duration::from_secs(2);
/// A hashing thread that has had nothing to do for this long gives its work area back, so that
/// memory returns to its baseline once a flood of logins is over.
const IDLE_RELEASE: Duration = Duration::from_secs(5);
/// Stored hashes are ours (19 MiB); one that asks for more than this is refused, not computed.
const MAX_HASH_MEMORY_KIB: u32 = 64 * 1024;

type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

struct Hashers {
    queue: flume::Sender<Job>,
}

impl Hashers {
    fn get() -> &'static Hashers {
        static HASHERS: OnceLock<Hashers> = OnceLock::new();
        HASHERS.get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let (queue, jobs) = flume::bounded::<Job>(threads * QUEUED_PER_THREAD);
            for n in 0..threads {
                let jobs = jobs.clone();
                std::thread::Builder::new()
                    .name(format!("switchyard-hash-{n}"))
                    .spawn(move || hash_thread(&jobs))
                    .expect("a hashing thread starts");
            }
            Hashers { queue }
        })
    }
}

fn hash_thread(jobs: &flume::Receiver<Job>) {
    // The work area of this thread, grown to the largest hash it has computed.
    let mut memory = Vec::new();
    loop {
        let next = if memory.is_empty() {
            jobs.recv()
                .map_err(|_| flume::RecvTimeoutError::Disconnected)
        } else {
            jobs.recv_timeout(IDLE_RELEASE)
        };
        match next {
            Ok(job) => job(&mut memory),
            // One mapping of its own (see `WORK_AREA_RESERVE`), unmapped as it is freed.
            Err(flume::RecvTimeoutError::Timeout) => memory = Vec::new(),
            Err(flume::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Runs `work` on a hashing thread with its work area.
async fn on_hash_thread<T: Send + 'static>(
    work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
) -> Result<T, AuthError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let deadline = Instant::now() + QUEUE_DEADLINE;
    let job: Job = Box::new(move |memory| {
        // A caller that gave up, or waited too long and was told so, needs no hash.
        if reply.is_closed() || Instant::now() > deadline {
            return;
        }
        let _ = reply.send(work(memory));
    });
    match Hashers::get().queue.try_send(job) {
        Ok(()) => {}
        Err(flume::TrySendError::Full(_)) => return Err(AuthError::Busy),
        Err(flume::TrySendError::Disconnected(_)) => {
            return Err(AuthError::Signing("the hashing threads are gone".into()));
        }
    }
    // A job dropped unanswered was past its deadline.
    answer.await.map_err(|_| AuthError::Busy)
}

fn params() -> Params {
    Params::default()
}

/// Blocks reserved for a work area, more than a hash uses: glibc serves an allocation past its
/// mmap threshold with a mapping of its own and unmaps it when freed, but raises the threshold to
/// the size of each mapping freed, up to 32 MiB; a 19 MiB area would come from the heap after the
/// first release and stay resident. Reserving more than 32 MiB keeps every area a mapping, and
/// pages never touched cost no memory.
const WORK_AREA_RESERVE: usize = 33 * 1024;

fn work_area(memory: &mut Vec<Block>, params: &Params) -> usize {
    let blocks = params.block_count();
    if memory.len() < blocks {
        if memory.capacity() < blocks {
            memory.reserve_exact(blocks.max(WORK_AREA_RESERVE) - memory.len());
        }
        memory.resize(blocks, Block::default());
    }
    blocks
}

fn hash_with(memory: &mut Vec<Block>, password: &str) -> Result<String, AuthError> {
    let failed = |e: &dyn std::fmt::Display| AuthError::Signing(format!("hashing failed: {e}"));
    let params = params();
    let blocks = work_area(memory, &params);
    let salt: [u8; 16] = rand::random();
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, &mut memory[..blocks])
        .map_err(|e| failed(&e))?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| failed(&e))?,
        salt: Some(Salt::new(&salt).map_err(|e| failed(&e))?),
        hash: Some(Output::new(&out).map_err(|e| failed(&e))?),
    };
    Ok(hash.to_string())
}

fn verify_with(memory: &mut Vec<Block>, password: &str, hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else {
        return false;
    };
    let Ok(version) = parsed
        .version
        .map_or(Ok(Version::default()), Version::try_from)
    else {
        return false;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_HASH_MEMORY_KIB {
        return false;
    }
    let blocks = work_area(memory, &params);
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..blocks])
        .is_ok()
        // `Output` compares in constant time.
        && Output::new(&out).is_ok_and(|computed| computed == *expected)
}

/// A user as listed: never the password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub updated_at: Millis,
}

#[derive(Serialize, Deserialize)]
struct StoredUser {
    role: Role,
    password_hash: String,
}

/// Adds a user, or replaces its password and role, recording `actor` in the audit log. Returns
/// the user as stored.
pub async fn put_user(
    engine: &Engine,
    name: &str,
    password: &str,
    role: Role,
    actor: &str,
) -> Result<User, AuthError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
    {
        return Err(AuthError::InvalidUser(
            "a user name is 1 to 64 letters, digits, '.', '_', '-' or '@'".into(),
        ));
    }
    if !role.for_users() {
        return Err(AuthError::InvalidUser(format!(
            "a user's role is viewer, operator or admin; {role} is for tokens \
             (switchyard token create --role {role})"
        )));
    }
    if password.chars().count() < 8 {
        return Err(AuthError::InvalidUser(
            "a password has at least 8 characters".into(),
        ));
    }
    let password = password.to_owned();
    let password_hash = on_hash_thread(move |memory| hash_with(memory, &password)).await??;
    let stored = serde_json::to_value(StoredUser {
        role,
        password_hash,
    })
    .expect("a user serializes");
    let now = engine.now();
    engine
        .store()
        .change_settings(
            vec![SettingChange::Put {
                namespace: USERS.into(),
                name: name.into(),
                value: stored,
            }],
            Some(NewAuditEntry {
                actor: actor.to_owned(),
                action: "user.set".into(),
                target: name.to_owned(),
                detail: json!({ "role": role }),
            }),
            now,
        )
        .await?;
    Ok(User {
        name: name.to_owned(),
        role,
        updated_at: now,
    })
}

pub async fn users(engine: &Engine) -> Result<Vec<User>, AuthError> {
    engine
        .store()
        .settings(USERS)
        .await?
        .into_iter()
        .map(|s| {
            let stored: StoredUser = serde_json::from_value(s.value)
                .map_err(|e| StoreError::Database(format!("user {}: {e}", s.name)))?;
            Ok(User {
                name: s.name,
                role: stored.role,
                updated_at: s.updated_at,
            })
        })
        .collect()
}

/// Returns whether the user existed; its sessions end with it.
pub async fn delete_user(engine: &Engine, name: &str, actor: &str) -> Result<bool, AuthError> {
    let deleted = engine
        .store()
        .change_settings(
            vec![SettingChange::Delete {
                namespace: USERS.into(),
                name: name.into(),
            }],
            Some(NewAuditEntry {
                actor: actor.to_owned(),
                action: "user.delete".into(),
                target: name.to_owned(),
                detail: json!({}),
            }),
            engine.now(),
        )
        .await?;
    Ok(deleted == [true])
}

/// Who logged in: the user's name, role and version (when it was last changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSession {
    pub name: String,
    pub role: Role,
    pub version: Millis,
}

/// The user, when `password` is theirs. An unknown user costs as much time as a wrong password,
/// so the answer does not tell which names exist.
pub async fn check_password(
    engine: &Engine,
    name: &str,
    password: &str,
) -> Result<UserSession, AuthError> {
    let stored = engine.store().setting(USERS, name).await?.and_then(|s| {
        let version = s.updated_at;
        serde_json::from_value::<StoredUser>(s.value)
            .ok()
            .map(|user| (user, version))
    });
    let (hash, session) = match stored {
        Some((user, version)) => (
            user.password_hash,
            Some(UserSession {
                name: name.to_owned(),
                role: user.role,
                version,
            }),
        ),
        None => (decoy_hash().await?, None),
    };
    let password = password.to_owned();
    let matches = on_hash_thread(move |memory| verify_with(memory, &password, &hash)).await?;
    match session {
        Some(session) if matches => Ok(session),
        _ => Err(AuthError::BadCredentials),
    }
}

/// Whether a token's session still stands: a login's token ends when its user is changed or
/// deleted. Tokens from `switchyard token create` belong to no user and stand until they expire.
pub async fn session_stands(engine: &Engine, claims: &Claims) -> Result<bool, AuthError> {
    let Some(version) = claims.user_version else {
        return Ok(true);
    };
    Ok(engine
        .store()
        .setting(USERS, &claims.sub)
        .await?
        .is_some_and(|user| user.updated_at == version))
}

/// A hash to verify against when the user does not exist.
async fn decoy_hash() -> Result<String, AuthError> {
    static DECOY: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    DECOY
        .get_or_try_init(|| async {
            on_hash_thread(|memory| hash_with(memory, "no such user")).await?
        })
        .await
        .cloned()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn password_hash_verifies_only_its_password_and_reads_argon2_hashes() {
        let mut memory = Vec::new();
        let hash = hash_with(&mut memory, "correct horse").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_with(&mut memory, "correct horse", &hash));
        assert!(!verify_with(&mut memory, "wrong horse", &hash));
        // A hash made by the argon2 crate's own hasher, as users stored before were.
        use argon2::PasswordHasher;
        let theirs = Argon2::default()
            .hash_password(b"correct horse")
            .unwrap()
            .to_string();
        assert!(verify_with(&mut memory, "correct horse", &theirs));
        assert!(!verify_with(&mut memory, "wrong horse", &theirs));
        assert!(!verify_with(&mut memory, "correct horse", "not a hash"));
    }

    #[test]
    fn a_hash_asking_for_too_much_memory_is_refused_without_computing_it() {
        let params = Params::new(MAX_HASH_MEMORY_KIB * 2, 1, 1, None).unwrap();
        let hash = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(19),
            params: ParamsString::try_from(&params).unwrap(),
            salt: Some(Salt::new(&[7; 16]).unwrap()),
            hash: Some(Output::new(&[0; 32]).unwrap()),
        };
        let mut memory = Vec::new();
        assert!(!verify_with(&mut memory, "x", &hash.to_string()));
        assert!(memory.is_empty(), "nothing was allocated");
    }

    #[tokio::test]
    async fn a_full_hash_queue_turns_callers_away_at_once() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Hashes that wait until released: every thread takes one, then the queue fills.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let mut held = Vec::new();
        let refused = loop {
            let gate = gate.clone();
            let call = tokio::spawn(on_hash_thread(move |_| {
                let _ = gate.lock().unwrap().recv();
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
            if call.is_finished() {
                break call.await.unwrap();
            }
            held.push(call);
            assert!(held.len() <= threads * (QUEUED_PER_THREAD + 1));
        };
        assert!(matches!(refused, Err(AuthError::Busy)), "{refused:?}");
        assert_eq!(held.len(), threads * (QUEUED_PER_THREAD + 1));
        drop(release);
        for call in held {
            assert!(call.await.unwrap().is_ok());
        }
    }
}
