//! Everything a job trains from, read and checked before the first step: both stages'
//! configurations, the decoded photos, the tokenizer with the concept's placeholder,
//! and the preview plan. A problem here costs no training time.

use std::path::PathBuf;

use coreg::base_model::BaseModel;
use coreg::dataset::TrainingImages;
use coreg::images::ImageLimits;
use coreg::method::stage1::Stage1Config;
use coreg::method::stage2::Stage2Config;
use coreg::model::tokenizer::ClipTokenizer;

use super::failure::Phase;
use super::Job;
use crate::exit::JobFailure;
use crate::previews::PreviewPlan;

/// Most photos a job may train on (the paper uses 3–10).
pub const MAX_IMAGES: usize = 20;

/// A job's checked inputs.
pub(super) struct Inputs {
    pub stage1: Stage1Config,
    pub stage2: Stage2Config,
    pub photos: TrainingImages,
    /// The base vocabulary plus the concept's placeholder.
    pub tokenizer: ClipTokenizer,
    pub placeholder: String,
    pub placeholder_id: i64,
    /// The super-category word S* starts from.
    pub category: String,
    /// `None` unless the job asks for previews.
    pub previews: Option<PreviewPlan>,
}

impl Job<'_> {
    /// Reads and checks the job's inputs against `model`'s tokenizer and device.
    pub(super) fn inputs(&self, model: &BaseModel) -> Result<Inputs, JobFailure> {
        let stage1 = self.stage1_config()?;
        let stage2 = self.stage2_config(model.device)?;
        let photos = TrainingImages::decode(&self.image_bytes()?, &ImageLimits::default())
            .map_err(Phase::Inputs.of())?
            .downscaled(2 * self.spec.training.resolution);
        let mut tokenizer = model.tokenizer.clone();
        let placeholder = self.placeholder();
        tokenizer
            .add_placeholder(&placeholder)
            .map_err(|e| JobFailure::InvalidJob(format!("concept.token: {e}")))?;
        let placeholder_id = tokenizer
            .token_id(&placeholder)
            .expect("the placeholder was just added");
        let previews = self.preview_plan(&stage1, &tokenizer, &placeholder)?;
        Ok(Inputs {
            stage1,
            stage2,
            photos,
            tokenizer,
            placeholder,
            placeholder_id,
            category: self.spec.concept.category.trim().to_string(),
            previews,
        })
    }

    /// The photos' encoded bytes, from the job's folder or the store.
    fn image_bytes(&self) -> Result<Vec<Vec<u8>>, JobFailure> {
        let images = &self.spec.images;
        let bytes = match &images.folder {
            Some(folder) => self.folder_images(&self.resolve(folder))?,
            None => self.stored_images(&images.keys)?,
        };
        if bytes.is_empty() {
            return Err(JobFailure::BadInput(
                "the job has no training images".into(),
            ));
        }
        Ok(bytes)
    }

    /// Every file in `folder`, in name order.
    fn folder_images(&self, folder: &std::path::Path) -> Result<Vec<Vec<u8>>, JobFailure> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map_err(|e| JobFailure::BadInput(format!("images.folder {}: {e}", folder.display())))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.len() > MAX_IMAGES {
            return Err(JobFailure::BadInput(format!(
                "{} holds {} files; a job trains on at most {MAX_IMAGES} images",
                folder.display(),
                files.len()
            )));
        }
        files
            .iter()
            .map(|p| {
                std::fs::read(p).map_err(|e| JobFailure::BadInput(format!("{}: {e}", p.display())))
            })
            .collect()
    }

    /// The objects `keys` name in the job's store.
    fn stored_images(&self, keys: &[String]) -> Result<Vec<Vec<u8>>, JobFailure> {
        if keys.len() > MAX_IMAGES {
            return Err(JobFailure::BadInput(format!(
                "{} image keys; a job trains on at most {MAX_IMAGES} images",
                keys.len()
            )));
        }
        let max_bytes = ImageLimits::default().max_bytes as u64;
        keys.iter()
            .map(|key| {
                // The size from the object's metadata first: a multi-GB object under
                // a photo's key must not be downloaded to be refused.
                let size = self
                    .block_on(self.store.size(key))
                    .map_err(Phase::Inputs.of())?;
                if size > max_bytes {
                    return Err(JobFailure::BadInput(format!(
                        "image `{key}` is {size} bytes; a photo may be at most {max_bytes}"
                    )));
                }
                self.block_on(self.store.get(key))
                    .map(|b| b.to_vec())
                    .map_err(Phase::Inputs.of())
            })
            .collect()
    }
}
