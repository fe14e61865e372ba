//! Artifacts: the files steps make or send (audio, images, uploads), kept beside the database
//! rather than in it, in a folder or an S3-compatible bucket through `object_store`.
//!
//! Each file is stored once under its SHA-256 (`sha256/<hex>`); a step's output refers to it as
//! `{artifact: {id, sha256, size, content_type}}`, and the database keeps a row per reference
//! (`artifacts`), written with the settlement of the attempt that made it and deleted with its
//! run. So a file is only as durable as its row: an attempt whose result was refused, or that
//! never finished, leaves a file no row names, which [`Artifacts::sweep`] removes once it is older
//! than [`SWEEP_GRACE`]. A save always writes its object anew (a rename onto the content's name),
//! so a file saved again is young again, and the sweep does not take it from under a row about
//! to be written.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt, stream::BoxStream};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::Millis;
use crate::store::Store;

/// The largest artifact by default: `--artifact-max-size`.
pub const DEFAULT_MAX_SIZE: u64 = 100 * 1024 * 1024;
/// How old a file no row names must be before the sweep deletes it: longer than an attempt
/// takes from saving a file to its settlement.
pub const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// Parts of a multipart upload: S3's smallest part is 5 MiB.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// What a step's output holds of a file it made: `{artifact: ArtifactRef}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub id: String,
    pub sha256: String,
    pub size: u64,
    pub content_type: String,
}

impl ArtifactRef {
    /// The value a step puts in its output.
    pub fn to_output(&self) -> serde_json::Value {
        serde_json::json!({ "artifact": self })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("the file is over the artifact size limit of {limit} bytes (--artifact-max-size)")]
    TooLarge { limit: u64 },
    #[error("there is no artifact {0:?}")]
    NotFound(String),
    #[error("artifact storage: {0}")]
    Storage(String),
    #[error("reading the file to store: {0}")]
    Source(String),
    #[error("`--artifacts {location}`: {why}")]
    Location { location: String, why: String },
    #[error("artifact store: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl ArtifactError {
    /// Whether trying again may succeed: storage that did not answer, a source that broke off.
    pub fn is_transient(&self) -> bool {
        match self {
            ArtifactError::Storage(_) | ArtifactError::Source(_) => true,
            ArtifactError::Store(e) => e.is_transient(),
            _ => false,
        }
    }
}

fn storage(e: object_store::Error) -> ArtifactError {
    match e {
        object_store::Error::NotFound { path, .. } => ArtifactError::NotFound(path),
        other => ArtifactError::Storage(other.to_string()),
    }
}

/// Where artifacts are kept, and the rows that name them.
pub struct Artifacts {
    objects: Arc<dyn ObjectStore>,
    store: Arc<dyn Store>,
    max_size: u64,
    /// Where they are, for messages: the folder, or the bucket and prefix.
    location: String,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("location", &self.location)
            .finish()
    }
}

impl Artifacts {
    /// Artifacts under `location`: a folder (made if missing), or `s3://bucket/prefix` with the
    /// credentials, region and endpoint of the `AWS_*` environment variables
    /// (`AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for an S3-compatible server of one's own).
    pub fn open(
        location: &str,
        store: Arc<dyn Store>,
        max_size: u64,
    ) -> Result<Self, ArtifactError> {
        let bad = |why: String| ArtifactError::Location {
            location: location.to_owned(),
            why,
        };
        let objects: Arc<dyn ObjectStore> = if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("names no bucket".into()));
            }
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            }
        } else if location.contains("://") {
            return Err(bad("is neither a folder nor s3://bucket/prefix".into()));
        } else {
            std::fs::create_dir_all(location).map_err(|e| bad(e.to_string()))?;
            Arc::new(LocalFileSystem::new_with_prefix(location).map_err(|e| bad(e.to_string()))?)
        };
        Ok(Artifacts {
            objects,
            store,
            max_size,
            location: location.to_owned(),
        })
    }

    /// Artifacts in this process's memory: for tests and embedders that keep no files.
    pub fn in_memory(store: Arc<dyn Store>, max_size: u64) -> Self {
        Artifacts {
            objects: Arc::new(InMemory::new()),
            store,
            max_size,
            location: "memory".into(),
        }
    }

    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    fn content_path(sha256: &str) -> Path {
        Path::from(format!("sha256/{sha256}"))
    }

    /// Stores what `body` yields as a new artifact, reading it once, in parts: memory holds a
    /// part at a time, however big the file. Over the size limit, it stops reading and stores
    /// nothing. The file counts once the attempt's settlement names it (see the module).
    pub async fn save<E: std::fmt::Display>(
        &self,
        content_type: &str,
        body: impl Stream<Item = Result<Bytes, E>>,
    ) -> Result<ArtifactRef, ArtifactError> {
        let id = uuid::Uuid::now_v7().to_string();
        let staging = Path::from(format!("staging/{id}"));
        let upload = self
            .objects
            .put_multipart(&staging)
            .await
            .map_err(storage)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut body = std::pin::pin!(body);
        let read = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ArtifactError::Source(e.to_string()))?;
                size += chunk.len() as u64;
                if size > self.max_size {
                    return Err(ArtifactError::TooLarge {
                        limit: self.max_size,
                    });
                }
                hasher.update(&chunk);
                writer.wait_for_capacity(2).await.map_err(storage)?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        if let Err(e) = read {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.finish().await.map_err(storage)?;
        let sha256 = hex::encode(hasher.finalize());
        self.objects
            .rename(&staging, &Self::content_path(&sha256))
            .await
            .map_err(storage)?;
        Ok(ArtifactRef {
            id,
            sha256,
            size,
            content_type: content_type.to_owned(),
        })
    }

    /// [`Artifacts::save`] of bytes in memory already (an image a service sent as base64).
    pub async fn save_bytes(
        &self,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<ArtifactRef, ArtifactError> {
        self.save(
            content_type,
            futures::stream::once(async { Ok::<_, std::convert::Infallible>(bytes) }),
        )
        .await
    }

    /// The artifact `id` names, from its row.
    pub async fn find(&self, id: &str) -> Result<ArtifactRef, ArtifactError> {
        self.store
            .artifact(id)
            .await?
            .ok_or_else(|| ArtifactError::NotFound(id.to_owned()))
    }

    /// The file `id` names, as it is read: its description and its bytes in parts.
    pub async fn open_file(
        &self,
        id: &str,
    ) -> Result<
        (
            ArtifactRef,
            BoxStream<'static, Result<Bytes, ArtifactError>>,
        ),
        ArtifactError,
    > {
        let found = self.find(id).await?;
        let stream = self.read(&found.sha256).await?;
        Ok((found, stream))
    }

    /// The bytes of the file stored under `sha256`, in parts.
    pub async fn read(
        &self,
        sha256: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, ArtifactError>>, ArtifactError> {
        let got = self
            .objects
            .get(&Self::content_path(sha256))
            .await
            .map_err(storage)?;
        Ok(got.into_stream().map_err(storage).boxed())
    }

    /// Deletes files no row names that are older than `grace` (now is `now`): what attempts left
    /// that were never settled, and what pruned runs named. Returns how many it deleted.
    pub async fn sweep(
        &self,
        now: Millis,
        grace: std::time::Duration,
    ) -> Result<u64, ArtifactError> {
        let before = now - grace.as_millis() as i64;
        let old = |meta: &object_store::ObjectMeta| meta.last_modified.timestamp_millis() < before;
        let mut deleted = 0;
        let staging: Vec<Path> = self
            .objects
            .list(Some(&Path::from("staging")))
            .try_filter(|m| futures::future::ready(old(m)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(storage)?;
        for path in staging {
            self.objects.delete(&path).await.map_err(storage)?;
            deleted += 1;
        }
        let mut stored = self.objects.list(Some(&Path::from("sha256")));
        let mut batch: Vec<String> = Vec::new();
        loop {
            let next = stored.try_next().await.map_err(storage)?;
            if let Some(meta) = &next
                && old(meta)
                && let Some(name) = meta.location.filename()
            {
                batch.push(name.to_owned());
            }
            if batch.len() >= 500 || (next.is_none() && !batch.is_empty()) {
                let named = self.store.artifact_hashes_named(&batch).await?;
                for sha256 in batch.drain(..).filter(|h| !named.contains(h)) {
                    self.objects
                        .delete(&Self::content_path(&sha256))
                        .await
                        .map_err(storage)?;
                    deleted += 1;
                }
            }
            if next.is_none() {
                return Ok(deleted);
            }
        }
    }
}
