//! Small tensor helpers the committee, the detector and the training loops
//! share: reading a tensor back to the host, a training step's loss as a
//! checked number, and a module's weights to bytes and back, refusing
//! weights that are not finite.

use burn::module::{Module, ModuleVisitor, Param};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Tensor};

use super::ModelError;

/// Appends `part` to `out` with its length in front (a little-endian u64): weight records laid
/// end to end this way are read back one at a time by [`next_part`].
pub(super) fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u64).to_le_bytes());
    out.extend_from_slice(part);
}

/// The first part [`push_part`] laid at the start of `bytes`, and what follows it; bytes too
/// short for the length they state are [`ModelError::Weights`], naming `what` they were.
pub(super) fn next_part<'a>(
    bytes: &'a [u8],
    what: &str,
) -> Result<(&'a [u8], &'a [u8]), ModelError> {
    let truncated = || ModelError::Weights(format!("truncated {what} weights"));
    let length: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(truncated)?;
    let end = usize::try_from(u64::from_le_bytes(length))
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|end| *end <= bytes.len())
        .ok_or_else(truncated)?;
    Ok((&bytes[8..end], &bytes[end..]))
}

/// Reads a tensor back to the host as `f32`s.
pub(super) fn read<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, ModelError> {
    tensor
        .try_into_vec_as::<f32>()
        .map_err(|err| ModelError::Backend(err.to_string()))
}

/// A one-element tensor (a loss) as a number.
pub(super) fn scalar(loss: &Tensor<1>) -> Result<f32, ModelError> {
    loss.clone()
        .try_into_scalar()
        .map_err(|err| ModelError::Backend(err.to_string()))
}

/// A training step's loss as a number; one that is not finite means the
/// run of `epoch` diverged.
pub(super) fn step_loss(loss: &Tensor<1>, epoch: usize) -> Result<f32, ModelError> {
    let value = scalar(loss)?;
    if !value.is_finite() {
        return Err(ModelError::Diverged { epoch });
    }
    Ok(value)
}

/// A module's weights as burnpack bytes; [`load_weights`] reads them back.
pub(super) fn weights_to_bytes<M: Module>(module: &M) -> Result<Vec<u8>, ModelError> {
    let bytes = module
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|err| ModelError::Weights(err.to_string()))?;
    // Usually hands over the buffer without a copy.
    Ok(bytes
        .try_into_vec::<u8>()
        .unwrap_or_else(|bytes| bytes.to_vec()))
}

/// `shape` (a module of the right shape, its values about to be replaced)
/// with the weights of `bytes`. Corrupt bytes, weights of another shape and
/// non-finite weights are all [`ModelError::Weights`]; nothing here panics
/// on bad bytes.
pub(super) fn load_weights<M: Module>(shape: M, bytes: &[u8]) -> Result<M, ModelError> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
        .map_err(|err| ModelError::Weights(err.to_string()))?
        // Anything stored as another float type is converted rather than loaded verbatim:
        // the forward pass assumes f32 parameters.
        .cast_to_module_dtype();
    // A missing or extra tensor is refused by the record.
    let module = shape
        .try_load_record(record)
        .map_err(|err| ModelError::Weights(err.to_string()))?;
    let mut check = FiniteCheck::default();
    module.visit(&mut check);
    match check.problem {
        Some(problem) => Err(ModelError::Weights(problem)),
        None => Ok(module),
    }
}

/// Finds the first parameter holding NaN or infinity: such weights load
/// "fine" and then predict garbage, so they are refused at load time
/// instead.
#[derive(Default)]
pub(super) struct FiniteCheck {
    path: Vec<String>,
    pub(super) problem: Option<String>,
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
