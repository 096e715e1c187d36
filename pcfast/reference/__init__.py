"""The specification: readable, float64-capable implementations every backend is tested against."""
from .bp import bp_train_step
from .common import forward, loss_sum, output_error
from .conv import (
    ConvLayer, LinearLayer, check_conv_net, conv_bp_train_step, conv_default_feedback_activations, conv_feedback_grads,
    conv_feedback_map, conv_forward, conv_gnt_targets, conv_gnt_train_step, conv_pc_activity_grads, conv_pc_energy,
    conv_pc_energy_terms, conv_pc_errors, conv_pc_relax, conv_pc_relax_traced, conv_pc_train_step,
    conv_pc_weight_grads, conv_tp_targets, conv_tp_train_step,
)
from .gnt import gnt_targets, gnt_train_step, output_jacobians
from .ipc import IPCTrajectory, ipc_trajectory
from .pc import pc_activity_grads, pc_energy, pc_energy_terms, pc_errors, pc_relax, pc_train_step, pc_weight_grads
from .tp import default_feedback_activations, feedback_grads, ridge_feedback, tp_targets, tp_train_step

__all__ = [
    "ConvLayer", "IPCTrajectory", "LinearLayer", "bp_train_step", "check_conv_net", "conv_bp_train_step",
    "conv_default_feedback_activations", "conv_feedback_grads", "conv_feedback_map", "conv_forward",
    "conv_gnt_targets", "conv_gnt_train_step", "conv_pc_activity_grads", "conv_pc_energy", "conv_pc_energy_terms",
    "conv_pc_errors", "conv_pc_relax", "conv_pc_relax_traced", "conv_pc_train_step", "conv_pc_weight_grads",
    "conv_tp_targets", "conv_tp_train_step", "default_feedback_activations", "feedback_grads", "forward",
    "gnt_targets", "gnt_train_step", "ipc_trajectory", "loss_sum", "output_error", "output_jacobians",
    "pc_activity_grads", "pc_energy", "pc_energy_terms", "pc_errors", "pc_relax", "pc_train_step",
    "pc_weight_grads", "ridge_feedback", "tp_targets", "tp_train_step",
]
