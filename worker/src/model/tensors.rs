//! Small tensor helpers the committee, the detector and the training loops
//! share: reading a tensor back to the host, a training step's loss as a
//! checked number, and the check that loaded weights are finite.

use burn::module::{ModuleVisitor, Param};
use burn::tensor::Tensor;

use super::ModelError;

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
