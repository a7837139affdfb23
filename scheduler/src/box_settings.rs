//! A box project's settings: the tile side its detector heads train and
//! run at, and the confidence from which its committee proposes an object.
//!
//! Both are decisions of a model version, not of each prediction: the
//! worker trains the heads at the tile size and judges the version's
//! holdout at the threshold, the version carries both, and every prediction
//! it makes uses them. So a change here applies from the project's next
//! training run (`sieve retrain`), and the activation of that version
//! rescores the open items with it; the active version keeps what it was
//! trained with. `sieve retrain --tile-size` overrides the tile for one run.
//!
//! Stored in `projects.box_settings` (`{}`: every default), only for
//! detection and deidentify projects (a CHECK constraint holds it to
//! those; `projects::set_box_settings` writes them). A deidentify
//! project's threshold is its plates'; its faces keep MTCNN's calibrated
//! 0.9.

use serde::{Deserialize, Serialize};
use sieve_shared::messages::{ModelArch, PROPOSAL_THRESHOLDS, TrainParams};

use crate::error::{AppError, AppResult};

/// What a project stores; `None`: the architecture's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BoxSettings {
    /// Tile side in pixels: a multiple of 32 from 64 to 1024 (default 384).
    /// Larger tiles see larger objects whole; smaller ones give the heads
    /// more tiles to learn from and cost less memory per tile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tile_size: Option<u32>,
    /// The committee's confidence from which an object is proposed, 0.1 to
    /// 0.95 (default 0.5; a deidentify project's plates 0.35). Lower finds
    /// more objects and draws more false boxes for people to delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proposal_threshold: Option<f32>,
}

/// A change to a project's [`BoxSettings`]: `None` leaves a field as it is,
/// `Some(None)` puts its default back.
#[derive(Clone, Copy, Debug, Default)]
pub struct BoxSettingsChange {
    pub tile_size: Option<Option<u32>>,
    pub proposal_threshold: Option<Option<f32>>,
}

/// A project's settings as they apply: the stored ones with the defaults
/// filled in.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct InForce {
    pub tile_size: u32,
    pub proposal_threshold: f32,
    /// What the project stores (absent fields take the defaults).
    pub stored: BoxSettings,
}

/// `tile` checked as the tile side of a run of `arch`: only the detector and the deidentify
/// plate heads cut images into tiles, whose side is a multiple of 32 (the backbone's stride)
/// from 64 to 1024.
pub fn check_tile_size(arch: ModelArch, tile: u32) -> AppResult<u32> {
    if !arch.takes_box_settings() {
        return Err(AppError::Invalid(format!(
            "tile_size = {tile}: only a detection or deidentify project's heads work on tiles; \
             a {} project's input size is its architecture's",
            arch.as_str()
        )));
    }
    if !tile.is_multiple_of(32) || !(64..=1024).contains(&tile) {
        return Err(AppError::Invalid(format!(
            "tile_size = {tile}: ask for a multiple of 32 from 64 to 1024"
        )));
    }
    Ok(tile)
}

impl BoxSettings {
    /// Why `arch` cannot have these settings, if it cannot.
    pub fn check(&self, arch: ModelArch) -> AppResult<()> {
        if let Some(tile) = self.tile_size {
            check_tile_size(arch, tile)?;
        }
        if let Some(threshold) = self.proposal_threshold {
            if !arch.takes_box_settings() {
                return Err(AppError::Invalid(format!(
                    "proposal_threshold = {threshold}: a {} project proposes no boxes",
                    arch.as_str()
                )));
            }
            if !PROPOSAL_THRESHOLDS.contains(&threshold) {
                return Err(AppError::Invalid(format!(
                    "proposal_threshold = {threshold}: ask for {} to {}",
                    PROPOSAL_THRESHOLDS.start(),
                    PROPOSAL_THRESHOLDS.end()
                )));
            }
        }
        Ok(())
    }

    /// `params` with these settings in place of the architecture's defaults.
    pub fn apply(&self, params: TrainParams) -> TrainParams {
        TrainParams {
            input_size: self.tile_size.or(params.input_size),
            proposal_threshold: self.proposal_threshold.or(params.proposal_threshold),
            ..params
        }
    }

    /// These settings with `change` made.
    pub fn changed(self, change: BoxSettingsChange) -> Self {
        Self {
            tile_size: change.tile_size.unwrap_or(self.tile_size),
            proposal_threshold: change.proposal_threshold.unwrap_or(self.proposal_threshold),
        }
    }

    /// The settings `arch` runs with: these, the defaults filled in; `None`
    /// for an architecture that draws no boxes.
    pub fn in_force(&self, arch: ModelArch) -> Option<InForce> {
        Some(InForce {
            tile_size: self.tile_size.unwrap_or(arch.default_input_size()),
            proposal_threshold: self
                .proposal_threshold
                .or(arch.default_proposal_threshold())?,
            stored: *self,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_is_not_stored() {
        let none = BoxSettings::default();
        let detector = none.in_force(ModelArch::Detector).unwrap();
        assert_eq!(
            (detector.tile_size, detector.proposal_threshold),
            (384, 0.5)
        );
        let faces = none.in_force(ModelArch::Faces).unwrap();
        assert_eq!(faces.proposal_threshold, 0.35);
        assert!(none.in_force(ModelArch::SmallCnn).is_none());
        let set = BoxSettings {
            tile_size: Some(256),
            proposal_threshold: Some(0.4),
        };
        let params = set.apply(TrainParams::for_arch(ModelArch::Detector));
        assert_eq!(
            (params.input_size(), params.proposal_threshold),
            (256, Some(0.4))
        );
        let reset = set.changed(BoxSettingsChange {
            proposal_threshold: Some(None),
            ..Default::default()
        });
        assert_eq!(
            reset,
            BoxSettings {
                tile_size: Some(256),
                proposal_threshold: None
            }
        );
    }

    #[test]
    fn settings_out_of_range_are_refused_with_the_range() {
        let refused = |settings: BoxSettings, arch| match settings.check(arch) {
            Err(AppError::Invalid(message)) => message,
            other => panic!("{settings:?} for {arch} was not refused: {other:?}"),
        };
        let tile = |tile| BoxSettings {
            tile_size: Some(tile),
            ..Default::default()
        };
        let threshold = |threshold| BoxSettings {
            proposal_threshold: Some(threshold),
            ..Default::default()
        };
        for bad in [0, 32, 100, 200, 1056] {
            assert!(
                refused(tile(bad), ModelArch::Detector).contains("multiple of 32 from 64 to 1024")
            );
        }
        assert!(refused(tile(2048), ModelArch::Faces).contains("tile_size = 2048"));
        assert!(refused(threshold(0.05), ModelArch::Detector).contains("0.1 to 0.95"));
        assert!(refused(threshold(f32::NAN), ModelArch::Detector).contains("0.1 to 0.95"));
        assert!(refused(threshold(0.5), ModelArch::SmallCnn).contains("proposes no boxes"));
        assert!(
            refused(tile(256), ModelArch::MobilenetV2).contains("input size is its architecture's")
        );
        assert!(threshold(0.95).check(ModelArch::Faces).is_ok());
        assert!(tile(1024).check(ModelArch::Detector).is_ok());
    }
}
