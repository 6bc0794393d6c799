//! The CoRe method (Wu et al., AAAI 2025): context-regularized embedding learning
//! (stage 1), U-Net fine-tuning (stage 2) and test-time optimization. The paper's
//! equations live here and nothing else does; `method.md` in the project docs lists
//! every default and where the reference implementation departs from the paper.

pub mod batch;
pub mod context;
pub mod losses;
pub mod prompts;
pub mod regularization;
pub mod rescale;
pub mod stage1;
pub mod stage2;
pub mod tto;
