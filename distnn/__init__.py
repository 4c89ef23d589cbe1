"""distnn: a numpy neural-network library whose training runs data-parallel on Ray.

Importing distnn does not import Ray; only ``distnn.parallel.ray_backend`` does.
"""
from ._memory import tune_allocator

tune_allocator()

from . import init, nn, ops, optim  # noqa: E402
from .autograd import Operator, Variable, eval_mode, is_training, no_grad, train_mode
from .gradcheck import gradcheck, gradcheck_module
from .models import build_model

__version__ = "0.1.0"
