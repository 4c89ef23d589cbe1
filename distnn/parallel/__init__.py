"""Data-parallel training: GradientWorker and ParameterServer (plain classes) and the backends that
deliver calls to them. Nothing here imports Ray until a RayBackend is made."""
from .backends import LocalBackend, RayBackend, make_backend
from .server import ParameterServer, StepAbandoned
from .worker import GradientWorker, NonFiniteError
