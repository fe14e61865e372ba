//! The files one attempt stores and reads, through the engine's [`Artifacts`]: what it stored
//! goes with its completion, and is named in the database only if that completion is accepted
//! with a success or a park.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;
use switchyard_engine::artifacts::{ArtifactError, ArtifactRef, Artifacts};
use switchyard_engine::state::StepFailure;

#[derive(Clone, Default)]
pub struct AttemptArtifacts {
    artifacts: Option<Arc<Artifacts>>,
    saved: Arc<Mutex<Vec<ArtifactRef>>>,
}

impl std::fmt::Debug for AttemptArtifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptArtifacts")
            .field("artifacts", &self.artifacts)
            .finish()
    }
}

/// An artifact error as an attempt's failure: a missing or oversized file is final, storage
/// that did not answer is worth another attempt.
pub fn artifact_failure(e: ArtifactError) -> StepFailure {
    let kind = match &e {
        ArtifactError::NotFound(_) => "artifact_not_found",
        ArtifactError::TooLarge { .. } => "artifact_too_large",
        _ => "artifacts",
    };
    if e.is_transient() {
        StepFailure::transient(kind, e.to_string())
    } else {
        StepFailure::permanent(kind, e.to_string())
    }
}

fn unavailable() -> StepFailure {
    StepFailure::permanent(
        "artifacts",
        "this worker keeps no artifacts: start it with --artifacts",
    )
}

impl AttemptArtifacts {
    pub fn new(artifacts: Option<Arc<Artifacts>>) -> Self {
        AttemptArtifacts {
            artifacts,
            saved: Arc::default(),
        }
    }

    fn artifacts(&self) -> Result<&Artifacts, StepFailure> {
        self.artifacts.as_deref().ok_or_else(unavailable)
    }

    /// The largest file an attempt may store.
    pub fn max_size(&self) -> u64 {
        self.artifacts.as_deref().map_or(0, Artifacts::max_size)
    }

    /// Stores what `body` yields; see [`Artifacts::save`].
    pub async fn save<E: std::fmt::Display>(
        &self,
        content_type: &str,
        body: impl Stream<Item = Result<Bytes, E>>,
    ) -> Result<ArtifactRef, StepFailure> {
        let saved = self
            .artifacts()?
            .save(content_type, body)
            .await
            .map_err(artifact_failure)?;
        self.saved
            .lock()
            .expect("saved artifacts poisoned")
            .push(saved.clone());
        Ok(saved)
    }

    pub async fn save_bytes(
        &self,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<ArtifactRef, StepFailure> {
        self.save(
            content_type,
            futures::stream::once(async { Ok::<_, std::convert::Infallible>(bytes) }),
        )
        .await
    }

    /// The file `id` names, and its bytes as they are read.
    pub async fn open(
        &self,
        id: &str,
    ) -> Result<
        (
            ArtifactRef,
            BoxStream<'static, Result<Bytes, ArtifactError>>,
        ),
        StepFailure,
    > {
        self.artifacts()?
            .open_file(id)
            .await
            .map_err(artifact_failure)
    }

    /// What this attempt stored, for its completion.
    pub fn take_saved(&self) -> Vec<ArtifactRef> {
        std::mem::take(&mut *self.saved.lock().expect("saved artifacts poisoned"))
    }
}
