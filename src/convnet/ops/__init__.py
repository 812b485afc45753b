"""The op API: ``op(device, *arrays, **params, out=None, stream=None)``, the same on numpy, cpu, emu and cuda.

See docs/architecture.md for layouts and the list of ops. Each family lives in its own module
(``convnet/ops/<family>.py``) beside its kernel (``csrc/kernels/<family>.cu``) and its NumPy reference
(``convnet/reference/<family>.py``); its ops are imported here by name.
"""
from convnet.ops.conv import (conv_backward_bias, conv_backward_data, conv_backward_filter, conv_forward,
                              conv_output_shape)
from convnet.ops.elementwise import dropout_backward, dropout_forward, dropout_mask, relu_backward, relu_forward
from convnet.ops.fc import fc_backward_bias, fc_backward_data, fc_backward_weights, fc_forward
from convnet.ops.local import local_backward_bias, local_backward_data, local_backward_filter, local_forward
from convnet.ops.lrn import lrn_backward, lrn_forward
from convnet.ops.neuron import (eltmax_backward, eltmax_forward, eltsum_backward, eltsum_forward, neuron_backward,
                                neuron_forward)
from convnet.ops.pool import pool_backward, pool_forward, pool_output_shape
from convnet.ops.rnorm import cnorm_backward, cnorm_forward, rnorm_backward, rnorm_forward
from convnet.ops.sgd import sgd_update, sgd_update_many
from convnet.ops.softmax import softmax_cross_entropy, softmax_forward, topk_errors
from convnet.ops.tensor import add, concat, multiply, scale, window
from convnet.ops.transfer import copy

__all__ = [
    "relu_forward", "relu_backward", "dropout_forward", "dropout_backward", "dropout_mask",
    "conv_forward", "conv_backward_data", "conv_backward_filter", "conv_backward_bias", "conv_output_shape",
    "local_forward", "local_backward_data", "local_backward_filter", "local_backward_bias",
    "pool_forward", "pool_backward", "pool_output_shape",
    "lrn_forward", "lrn_backward",
    "rnorm_forward", "rnorm_backward", "cnorm_forward", "cnorm_backward",
    "neuron_forward", "neuron_backward", "eltsum_forward", "eltsum_backward", "eltmax_forward", "eltmax_backward",
    "softmax_forward", "softmax_cross_entropy", "topk_errors",
    "fc_forward", "fc_backward_data", "fc_backward_weights", "fc_backward_bias",
    "concat", "add", "scale", "window", "multiply",
    "copy",
    "sgd_update", "sgd_update_many",
]
