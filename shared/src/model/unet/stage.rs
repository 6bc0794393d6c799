//! A U-Net block as the forward pass runs it: directly, or, with gradient
//! checkpointing on, through [`checkpoint`] so that its activations are recomputed in
//! backward instead of kept.
//!
//! The recomputation runs a closure that libtorch keeps in the autograd graph and may
//! call from its own threads, so it must own (`'static`) and send (`Send`) what it
//! uses: the block is shared behind `Arc<Mutex<_>>` (tensors are `Send`, not `Sync`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tch::Tensor;

use crate::model::checkpoint::checkpoint;

#[derive(Debug)]
pub struct Stage<B> {
    block: Arc<Mutex<B>>,
    cross_attention_layers: usize,
}

impl<B: Send + 'static> Stage<B> {
    /// `cross_attention_layers`: how many attention means the block records.
    pub fn new(block: B, cross_attention_layers: usize) -> Self {
        Self {
            block: Arc::new(Mutex::new(block)),
            cross_attention_layers,
        }
    }

    pub fn cross_attention_layers(&self) -> usize {
        self.cross_attention_layers
    }

    pub fn lock(&self) -> MutexGuard<'_, B> {
        // A panic inside a block (a libtorch error the service catches) must not
        // disable the model for later requests: the block itself holds no state that
        // a panic could leave half-updated.
        self.block.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `f(block, inputs, record)`, checkpointed when `checkpointed` is set. Every
    /// tensor `f` needs besides the block's own variables must come in `inputs`, so
    /// that gradients reach it through the checkpoint. Recorded attention means become
    /// extra outputs of the checkpoint, so a loss on them backpropagates through the
    /// recomputation too.
    pub fn run<F>(
        &self,
        checkpointed: bool,
        inputs: &[&Tensor],
        record: Option<&mut Vec<Tensor>>,
        f: F,
    ) -> Vec<Tensor>
    where
        F: Fn(&B, &[Tensor], Option<&mut Vec<Tensor>>) -> Vec<Tensor> + Send + 'static,
    {
        if !checkpointed {
            let inputs: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
            return f(&self.lock(), &inputs, record);
        }
        let block = Arc::clone(&self.block);
        let recording = record.is_some();
        let mut outputs = checkpoint(inputs, move |inputs: &[Tensor]| {
            let block = block.lock().unwrap_or_else(PoisonError::into_inner);
            let mut recorded = Vec::new();
            let mut outputs = f(&block, inputs, recording.then_some(&mut recorded));
            outputs.extend(recorded);
            outputs
        });
        if let Some(record) = record {
            record.extend(outputs.split_off(outputs.len() - self.cross_attention_layers));
        }
        outputs
    }
}
