//! [`Committee`]: the inference side of a model version, and its weights as bytes.
//!
//! Inputs and outputs are plain `Vec`s and slices, never tensors, so that callers (the queue
//! consumer, the scheduler's tests) need no burn types and the device stays an implementation
//! detail. Weights travel as burnpack bytes in memory (`Module::into_record().into_bytes()`),
//! because they go to an object store, not to a local file.

use burn::module::{Module, ModuleVisitor, Param};
use burn::store::ModuleRecord;
use burn::tensor::activation::softmax;
use burn::tensor::{Bytes, Device, Tensor, TensorData};

use super::net::SmallCnn;
use super::{ArchitectureConfig, ModelError, check_images};

/// Images per forward pass. Bounds activation memory (the first conv layer alone is 50 KiB per
/// 28x28 image) when a caller hands over a large batch; large enough to keep the CPU busy.
const INFERENCE_CHUNK: usize = 256;

/// Class probabilities per item, per member: `probs[item][member][class]`.
pub type CommitteeProbs = Vec<Vec<Vec<f32>>>;
/// Backbone embedding per item: `embeddings[item][dim]`.
pub type Embeddings = Vec<Vec<f32>>;

/// A committee: one small CNN backbone shared by K linear heads (one backbone forward per
/// batch, K cheap heads).
///
/// Immutable once built; share it between threads with an `Arc`.
#[derive(Clone, Debug)]
pub struct Committee {
    /// Always on the plain (non-autodiff) device: inference must not build autodiff graphs.
    pub(crate) net: SmallCnn,
    pub(crate) config: ArchitectureConfig,
    pub(crate) device: Device,
}

impl Committee {
    /// Fresh, untrained weights, deterministic for `seed` (each head has its own stream derived
    /// from `seed`, so the members differ from the start).
    pub fn init(
        config: &ArchitectureConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let device = device.clone().without_autodiff();
        let net = SmallCnn::init(config, seed, &device)?;
        Ok(Self {
            net,
            config: config.clone(),
            device,
        })
    }

    pub fn config(&self) -> &ArchitectureConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same weights on another device (a CPU baseline beside a GPU, say).
    pub fn to_device(&self, device: &Device) -> Self {
        let device = device.clone().without_autodiff();
        Self {
            net: self.net.clone().to_device(&device),
            config: self.config.clone(),
            device,
        }
    }

    /// Class probabilities of every member for every image.
    ///
    /// `images`: `batch * config.input_len()` f32 values, already normalized, layout
    /// `[batch, channels, h, w]`. Returns `out[item][member][class]`; each member's
    /// probabilities sum to 1.
    pub fn predict(&self, images: &[f32], batch: usize) -> Result<CommitteeProbs, ModelError> {
        Ok(self.run(images, batch, false)?.0)
    }

    /// Like [`predict`](Self::predict), and also the backbone embedding of every image:
    /// `(probs[item][member][class], embeddings[item][dim])`.
    pub fn predict_with_embeddings(
        &self,
        images: &[f32],
        batch: usize,
    ) -> Result<(CommitteeProbs, Embeddings), ModelError> {
        self.run(images, batch, true)
    }

    /// The weights as burnpack bytes; [`from_weights`](Self::from_weights) with the same config
    /// reads them back.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let bytes = self
            .net
            .clone()
            .into_record()
            .into_bytes()
            .map_err(|err| ModelError::Weights(err.to_string()))?;
        // Usually hands over the buffer without a copy.
        Ok(bytes
            .try_into_vec::<u8>()
            .unwrap_or_else(|bytes| bytes.to_vec()))
    }

    /// Rebuilds a committee from [`weights_to_bytes`](Self::weights_to_bytes) output.
    ///
    /// Corrupt bytes, weights of another shape (a different `num_classes`, `members`, …) and
    /// non-finite weights are all [`ModelError::Weights`]; nothing here panics on bad bytes.
    pub fn from_weights(
        config: &ArchitectureConfig,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let device = device.clone().without_autodiff();
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
            .map_err(|err| ModelError::Weights(err.to_string()))?
            // Anything stored as another float type is converted rather than loaded verbatim:
            // the forward pass assumes f32 parameters.
            .cast_to_module_dtype();
        // The seed does not matter: every parameter is overwritten, and a missing or extra
        // tensor is refused by the record.
        let net = SmallCnn::init(config, 0, &device)?
            .try_load_record(record)
            .map_err(|err| ModelError::Weights(err.to_string()))?;

        let mut check = FiniteCheck::default();
        net.visit(&mut check);
        if let Some(problem) = check.problem {
            return Err(ModelError::Weights(problem));
        }
        Ok(Self {
            net,
            config: config.clone(),
            device,
        })
    }

    fn run(
        &self,
        images: &[f32],
        batch: usize,
        with_embeddings: bool,
    ) -> Result<(CommitteeProbs, Embeddings), ModelError> {
        check_images(&self.config, images, batch)?;
        let input_len = self.config.input_len();
        let (members, classes) = (self.config.members, self.config.num_classes);
        let mut probs = Vec::with_capacity(batch);
        let mut embeddings = Vec::with_capacity(if with_embeddings { batch } else { 0 });

        for chunk in images.chunks(INFERENCE_CHUNK * input_len) {
            let n = chunk.len() / input_len;
            let output = self.net.forward(self.images_tensor(chunk, n, &self.device));
            let flat = read(softmax(output.logits, 2))?; // [n, members, classes]
            probs.extend(flat.chunks(members * classes).map(|item| {
                item.chunks(classes)
                    .map(<[f32]>::to_vec)
                    .collect::<Vec<_>>()
            }));
            if with_embeddings {
                let flat = read(output.embedding)?; // [n, embedding_dim]
                embeddings.extend(flat.chunks(self.config.embedding_dim).map(<[f32]>::to_vec));
            }
        }
        Ok((probs, embeddings))
    }

    /// # Shapes
    /// - returns `[n, channels, input_size, input_size]` on `device`
    pub(crate) fn images_tensor(&self, images: &[f32], n: usize, device: &Device) -> Tensor<4> {
        let side = self.config.input_size;
        let shape = [n, self.config.channels, side, side];
        Tensor::from_data(TensorData::new(images.to_vec(), shape), device)
    }
}

/// Reads a tensor back to the host as `f32`s.
fn read<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, ModelError> {
    tensor
        .try_into_vec_as::<f32>()
        .map_err(|err| ModelError::Backend(err.to_string()))
}

/// Finds the first parameter holding NaN or infinity: such weights load "fine" and then
/// predict NaN for every image, so they are refused at load time instead.
#[derive(Default)]
struct FiniteCheck {
    path: Vec<String>,
    problem: Option<String>,
}

impl ModuleVisitor for FiniteCheck {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.problem.is_some() {
            return;
        }
        let path = self.path.join(".");
        match param.val().try_into_vec_as::<f32>() {
            Ok(values) if values.iter().all(|value| value.is_finite()) => {}
            Ok(_) => self.problem = Some(format!("{path} holds non-finite values")),
            Err(err) => self.problem = Some(format!("{path} is unreadable: {err}")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::test_data::squares;

    fn config() -> ArchitectureConfig {
        ArchitectureConfig::small_cnn(10, 3)
    }

    fn committee(seed: u64) -> Committee {
        Committee::init(&config(), seed, &Device::flex()).unwrap()
    }

    fn assert_close(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], tolerance: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a
            .iter()
            .flatten()
            .flatten()
            .zip(b.iter().flatten().flatten())
        {
            assert!((x - y).abs() <= tolerance, "{x} vs {y}");
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Committee>();
    }

    #[test]
    fn predicts_one_distribution_per_item_and_member() {
        let committee = committee(1);
        let (images, _) = squares(&config(), 5, 0);
        let (probs, embeddings) = committee.predict_with_embeddings(&images, 5).unwrap();

        assert_eq!(probs.len(), 5);
        for item in &probs {
            assert_eq!(item.len(), 3);
            for member in item {
                assert_eq!(member.len(), 10);
                let sum: f32 = member.iter().sum();
                assert!((sum - 1.0).abs() < 1e-4, "sum {sum}");
                assert!(member.iter().all(|p| (0.0..=1.0).contains(p)));
            }
        }
        assert_eq!(embeddings.len(), 5);
        assert!(embeddings.iter().all(|e| e.len() == 64));
        // The embedding is taken after the ReLU.
        assert!(embeddings.iter().flatten().all(|&v| v >= 0.0));
        assert_close(&committee.predict(&images, 5).unwrap(), &probs, 0.0);
    }

    #[test]
    fn large_batches_match_small_ones() {
        // More than one inference chunk: items must stay in order across chunks.
        let committee = committee(1);
        let n = INFERENCE_CHUNK + 3;
        let (images, _) = squares(&config(), n, 0);
        let all = committee.predict(&images, n).unwrap();
        let tail = committee
            .predict(&images[(n - 3) * config().input_len()..], 3)
            .unwrap();
        assert_eq!(all.len(), n);
        assert_close(&all[n - 3..], &tail, 1e-5);
    }

    #[test]
    fn an_empty_batch_predicts_nothing() {
        assert!(committee(1).predict(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_input() {
        let committee = committee(1);
        let (mut images, _) = squares(&config(), 2, 0);
        assert!(matches!(
            committee.predict(&images, 3),
            Err(ModelError::BadInput { .. })
        ));
        assert!(matches!(
            committee.predict(&images[1..], 2),
            Err(ModelError::BadInput { .. })
        ));
        images[7] = f32::NAN;
        assert!(matches!(
            committee.predict_with_embeddings(&images, 2),
            Err(ModelError::BadInput { .. })
        ));
    }

    #[test]
    fn refuses_bad_configs() {
        let device = Device::flex();
        let mut unknown = config();
        unknown.arch = "resnet50".into();
        assert!(matches!(
            Committee::init(&unknown, 0, &device),
            Err(ModelError::UnknownArchitecture(name)) if name == "resnet50"
        ));
        let lonely = ArchitectureConfig::small_cnn(10, 1);
        assert!(matches!(
            Committee::init(&lonely, 0, &device),
            Err(ModelError::InvalidConfig(_))
        ));
    }

    #[test]
    fn init_is_deterministic_for_a_seed() {
        let (images, _) = squares(&config(), 4, 0);
        let a = committee(7).predict(&images, 4).unwrap();
        let b = committee(7).predict(&images, 4).unwrap();
        let other = committee(8).predict(&images, 4).unwrap();
        assert_close(&a, &b, 0.0);
        assert_ne!(a, other, "another seed must give other weights");
        // Each head has its own initialisation.
        assert_ne!(a[0][0], a[0][1]);
    }

    #[test]
    fn weights_round_trip_exactly() {
        let committee = committee(3);
        let bytes = committee.weights_to_bytes().unwrap();
        let loaded = Committee::from_weights(&config(), &bytes, &Device::flex()).unwrap();

        let (images, _) = squares(&config(), 6, 1);
        assert_close(
            &committee.predict(&images, 6).unwrap(),
            &loaded.predict(&images, 6).unwrap(),
            1e-6,
        );
        assert_eq!(loaded.config(), &config());
    }

    #[test]
    fn refuses_weights_that_do_not_fit() {
        let device = Device::flex();
        let bytes = committee(3).weights_to_bytes().unwrap();
        let refused = |config: &ArchitectureConfig, bytes: &[u8]| {
            matches!(
                Committee::from_weights(config, bytes, &device),
                Err(ModelError::Weights(_))
            )
        };

        assert!(refused(&config(), &bytes[..bytes.len() / 2]), "truncated");
        assert!(refused(&config(), &[]), "empty");
        assert!(refused(&config(), &[0xAB; 4096]), "garbage");
        assert!(refused(&config(), b"not a model at all"), "text");
        assert!(
            refused(&ArchitectureConfig::small_cnn(5, 3), &bytes),
            "num_classes"
        );
        assert!(
            refused(&ArchitectureConfig::small_cnn(10, 4), &bytes),
            "members"
        );
        let mut wide = config();
        wide.embedding_dim = 32;
        assert!(refused(&wide, &bytes), "embedding_dim");
    }

    #[test]
    fn corrupted_weights_never_panic() {
        // Flip bytes all over the file (header, metadata, data): every load is either a
        // clean error or a committee that still predicts finite probabilities.
        let device = Device::flex();
        let bytes = committee(3).weights_to_bytes().unwrap();
        let (images, _) = squares(&config(), 1, 0);
        let step = (bytes.len() / 200).max(1);
        for position in (0..bytes.len()).step_by(step).chain(0..64) {
            let mut corrupt = bytes.clone();
            corrupt[position] ^= 0xFF;
            match Committee::from_weights(&config(), &corrupt, &device) {
                Ok(loaded) => {
                    let probs = loaded.predict(&images, 1).unwrap();
                    assert!(probs.iter().flatten().flatten().all(|p| p.is_finite()));
                }
                Err(ModelError::Weights(_)) => {}
                Err(other) => panic!("byte {position}: unexpected error {other}"),
            }
        }
    }

    #[test]
    fn refuses_non_finite_weights() {
        let bytes = committee(3).weights_to_bytes().unwrap();
        // Overwrite the last parameter value (data sits at the end of a burnpack) with NaN.
        let mut poisoned = bytes.clone();
        let end = poisoned.len();
        poisoned[end - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            Committee::from_weights(&config(), &poisoned, &Device::flex()),
            Err(ModelError::Weights(message)) if message.contains("non-finite")
        ));
    }
}
