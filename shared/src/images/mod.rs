//! Pixels in and out: the concept photos a user uploads, how training sees them, and
//! the PNGs generation returns.
//!
//! - [`decode`]: untrusted bytes → upright RGB, within documented limits.
//! - [`augment`]: the reference implementation's random rotation, resize, flip and crop.
//! - [`png`]: images in [−1, 1] → PNG bytes, quantized as diffusers does.

pub mod augment;
pub mod decode;
pub mod png;

pub use augment::{AugmentPlan, Augmentation};
pub use decode::{decode_training_image, ImageLimits, TrainingImageFormat};
pub use png::{decode_png, tensor_to_png};
