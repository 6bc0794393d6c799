//! A job's checkpoints in the store: `jobs/<id>/checkpoint.json` names the stage, its
//! scalars and loss history, and the safetensors file under `jobs/<id>/checkpoints/`
//! that holds its tensors. A new state file is written before the record points at it
//! and the old one is deleted only after, so a crash at any moment leaves a record
//! that names an existing file.

use bytes::Bytes;
use coreg::artifact::tensor_file::{read_from_store, TensorFile};
use coreg::artifact::LossHistory;
use coreg::method::stage1::Stage1Scalars;
use coreg::method::stage2::Stage2Scalars;
use coreg::store::Store;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::failure::Phase;
use super::Job;
use crate::exit::JobFailure;

/// Where a job's run stands in the store (`jobs/<id>/checkpoint.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub(super) enum Checkpoint {
    Stage1 {
        tensors: String,
        scalars: Stage1Scalars,
        losses: LossHistory,
    },
    Stage2 {
        /// The stage-1 result stage 2 trains with.
        embedding: String,
        tensors: String,
        scalars: Stage2Scalars,
        losses: LossHistory,
    },
}

impl Checkpoint {
    /// The state file this record points at.
    fn tensors(&self) -> &str {
        match self {
            Checkpoint::Stage1 { tensors, .. } | Checkpoint::Stage2 { tensors, .. } => tensors,
        }
    }
}

impl Job<'_> {
    /// The checkpoint a run resumes from, if an earlier run left one; its state file
    /// becomes the one the next checkpoint supersedes.
    pub(super) fn resume_point(&self) -> Result<Option<Checkpoint>, JobFailure> {
        let checkpoint = match self.block_on(self.store.get(&self.key("checkpoint.json"))) {
            Ok(bytes) => serde_json::from_slice::<Checkpoint>(&bytes)
                .map_err(|e| JobFailure::Failed(format!("unreadable checkpoint record: {e}")))?,
            Err(coreg::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Phase::Training.classify(e)),
        };
        let (stage, step) = match &checkpoint {
            Checkpoint::Stage1 { scalars, .. } => (1, scalars.step),
            Checkpoint::Stage2 { scalars, .. } => (2, scalars.step),
        };
        *self.state_file.borrow_mut() = Some(checkpoint.tensors().to_string());
        tracing::info!(job = %self.id, stage, step, "resuming from checkpoint");
        Ok(Some(checkpoint))
    }

    /// Writes a stage's state tensors under `jobs/<id>/checkpoints/` and returns
    /// their key; the caller then points the record at them
    /// ([`advance_checkpoint`](Job::advance_checkpoint)). Streamed in parts from the
    /// tensors themselves: a 10 GB stage-2 state costs a few MB of host memory.
    pub(super) fn put_tensors(
        &self,
        name: &str,
        tensors: &[(String, Tensor)],
    ) -> Result<String, JobFailure> {
        let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        let file = TensorFile::new(&named, Default::default()).map_err(Phase::Training.of())?;
        let path = self.key(&format!("checkpoints/{name}.safetensors"));
        self.fence()?;
        self.block_on(self.store.put_streamed(&path, &mut file.reader()))
            .map_err(Phase::Training.of())?;
        Ok(path)
    }

    /// A state file's tensors, read in ranges straight into CPU tensors.
    pub(super) fn get_tensors(&self, path: &str) -> Result<Vec<(String, Tensor)>, JobFailure> {
        let (tensors, _) = self
            .block_on(read_from_store(&self.store, path))
            .map_err(Phase::Training.of())?;
        Ok(tensors.into_iter().collect())
    }

    /// Points `checkpoint.json` at `checkpoint`, then deletes the state file the
    /// previous record named (unless it is still referenced).
    pub(super) fn advance_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobFailure> {
        let bytes = serde_json::to_vec_pretty(checkpoint)
            .map_err(|e| JobFailure::Failed(format!("checkpoint record: {e}")))?;
        self.fence()?;
        self.block_on(
            self.store
                .put_overwrite(&self.key("checkpoint.json"), Bytes::from(bytes)),
        )
        .map_err(Phase::Training.of())?;
        let current = checkpoint.tensors().to_string();
        let previous = self.state_file.borrow_mut().replace(current.clone());
        match previous {
            Some(old) if old != current => self
                .block_on(self.store.delete(&old))
                .map_err(Phase::Training.of()),
            _ => Ok(()),
        }
    }

    /// Drops the job's checkpoints (see [`discard_checkpoints`]).
    pub(super) fn discard_checkpoints(&self) -> Result<(), JobFailure> {
        self.fence()?;
        self.block_on(discard_checkpoints(&self.store, &self.id))
            .map_err(Phase::Training.of())
    }
}

/// Deletes job `id`'s checkpoint record first, so that a crash part-way leaves no
/// record naming a deleted checkpoint, then its checkpoints. For a job that is done
/// with them: published, cancelled or failed.
pub async fn discard_checkpoints(store: &Store, id: &str) -> coreg::Result<()> {
    store.delete(&format!("jobs/{id}/checkpoint.json")).await?;
    for object in store.list(&format!("jobs/{id}/checkpoints/")).await? {
        store.delete(&object.path).await?;
    }
    Ok(())
}
