"""distnn: a numpy neural-network library whose training runs data-parallel on Ray.

Importing distnn imports no Ray and changes nothing in the host process: the allocator tuning
(``tune_allocator``) is a call that the ``distnn`` command and the Ray worker processes make.
"""
from . import init, nn, ops, optim
from ._memory import tune_allocator
from .api import fit, tune
from .run import Run, load
from .autograd import Operator, Variable, eval_mode, is_training, no_grad, train_mode
from .gradcheck import gradcheck, gradcheck_module
from .models import build_model

__version__ = "0.1.0"
