"""wsurgery: Weight Standardization surgery and transfer learning for timm models.

The flow, one module per step::

    load -> convert -> calibrate -> train -> fold -> export / verify

>>> import wsurgery
>>> model = wsurgery.load("resnet18", pretrained=False)
>>> model, report = wsurgery.convert(model, mode="aws", norm="gn")
>>> saved = wsurgery.save(model, "runs/r18-ws")            # doctest: +SKIP
>>> exported = wsurgery.export(model, "export/r18")        # doctest: +SKIP
>>> wsurgery.verify("export/r18", model).passed    # doctest: +SKIP
True
"""

__version__ = "0.1.0"

from . import _compat, deploy, io  # _compat first: it checks the timm version before anything relies on it
from .accumulate import compile_standardization, standardize_once
from .calibrate import CalibrationConfig, CalibrationResult, calibrate
from .compare import Agreement, compare
from .config import SurgeryConfig
from .convert import LayerChange, SurgeryReport, convert, is_converted, pooled_norms
from .datasets import build_datasets
from .demo import run_demo
from .deploy import DeployResult, export_onnx, export_program, find_weight_standardization
from .errors import WSurgeryError
from .export import ExportResult, export
from .fold import fold
from .load import load, load_checkpoint
from .predict import Prediction, predict
from .recipes import Recipe, load_recipe
from .save import save
from .standardize import CONVENTIONS, standardize_weight
from .summary import inspect
from .train import TrainEvent, TrainResult, train
from .verify import VerifyResult, verify
from .weights import find_efficientnet_lite_checkpoint, load_efficientnet_lite

__all__ = [
    "CONVENTIONS",
    "Agreement",
    "CalibrationConfig",
    "CalibrationResult",
    "DeployResult",
    "ExportResult",
    "LayerChange",
    "Prediction",
    "Recipe",
    "SurgeryConfig",
    "SurgeryReport",
    "TrainEvent",
    "TrainResult",
    "VerifyResult",
    "WSurgeryError",
    "__version__",
    "build_datasets",
    "calibrate",
    "compare",
    "compile_standardization",
    "convert",
    "deploy",
    "export",
    "export_onnx",
    "export_program",
    "find_efficientnet_lite_checkpoint",
    "find_weight_standardization",
    "fold",
    "inspect",
    "is_converted",
    "load",
    "load_checkpoint",
    "load_efficientnet_lite",
    "load_recipe",
    "pooled_norms",
    "predict",
    "run_demo",
    "save",
    "standardize_once",
    "standardize_weight",
    "train",
    "verify",
]
